"""hayate chat: an interactive multi-turn chat in the terminal."""
from __future__ import annotations

import argparse
import sys

from hayate.cli import engine_config, sampling_params, stream_to_stdout, summary_line, user_message
from hayate.engine.request import RequestFailedError
from hayate.multimodal.image import ImageLimits, MediaError

HELP = ("commands: /image PATH (attach an image to your next message), /reset (forget the "
        "conversation), /exit (leave); Ctrl-C stops an answer")


def command_chat(args: argparse.Namespace) -> int:
    from hayate.llm import LLM

    params = sampling_params(args)
    llm = LLM(config=engine_config(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    images: list = []   # attached with /image, sent with the next message
    print(f"hayate chat with {llm.model_path.name}. {HELP}", file=sys.stderr)
    while True:
        user = _read_line()
        if user is None or user.strip() == "/exit":
            return 0
        if user.strip() == "/reset":
            history.clear()
            images.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if user.strip().startswith("/image"):
            _attach(user.strip()[len("/image"):].strip(), images)
            continue
        if not user.strip():
            continue
        turn = user_message(user, images, args.image_detail)
        images = []
        try:
            answer = _answer(llm, system + history + [turn], params)
        except (ValueError, OSError, RequestFailedError) as error:   # e.g. a text-only model given an image
            print(f"hayate: error: {error}", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": answer}]


def _attach(path: str, images: list) -> None:
    from hayate.multimodal.media import load_image_file

    if not path:
        print("usage: /image PATH", file=sys.stderr)
        return
    try:
        images.append(load_image_file(path, ImageLimits()))
    except MediaError as error:
        print(f"hayate: error: {error}", file=sys.stderr)
        return
    print(f"(image {len(images)} attached: {path})", file=sys.stderr)


def _read_line() -> str | None:
    """The user's next message; None at end of input."""
    while True:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=sys.stderr)


def _answer(llm, messages: list[dict], params) -> str:
    """Stream one answer; Ctrl-C stops it and keeps what was said so far."""
    outputs = llm.stream_chat(messages, params)
    pieces: list[str] = []

    def collect():
        for output in outputs:
            pieces.append(output.text)
            yield output

    try:
        last = stream_to_stdout(collect())
        if last is not None:
            print(summary_line(last), file=sys.stderr)
    except KeyboardInterrupt:
        outputs.close()  # aborts the request and frees its KV space
        print("\n(stopped)", file=sys.stderr)
    return "".join(pieces)
