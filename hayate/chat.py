"""hayate chat: an interactive multi-turn chat in the terminal."""
from __future__ import annotations

import argparse
import sys

from hayate.cli import engine_config, sampling_params, stream_to_stdout, summary_line

HELP = "commands: /reset (forget the conversation), /exit (leave); Ctrl-C stops an answer"


def command_chat(args: argparse.Namespace) -> int:
    from hayate.llm import LLM

    params = sampling_params(args)
    llm = LLM(config=engine_config(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"hayate chat with {llm.model_path.name}. {HELP}", file=sys.stderr)
    while True:
        user = _read_line()
        if user is None or user.strip() == "/exit":
            return 0
        if user.strip() == "/reset":
            history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        answer = _answer(llm, system + history, params)
        history.append({"role": "assistant", "content": answer})


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
