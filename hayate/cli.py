"""hayate run | chat | serve | plan: the command line."""
from __future__ import annotations

import argparse
import sys
from typing import Iterator

from hayate.config import DTYPES, GRAMMAR_BACKENDS, KV_CACHE_DTYPES, WEIGHT_MODES, EngineConfig
from hayate.engine.request import ImageTimings, RequestFailedError, RequestOutput
from hayate.sampling import SamplingParams
from hayate.structured.requests import from_cli

EXIT_USAGE = 2


class CliError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hayate", description="Real-time inference for open language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="answer one prompt, streamed")
    run.add_argument("prompt", help="the user message")
    run.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image to ask about (repeatable; vision models only)")
    run.add_argument("--tools", metavar="FILE", help="a JSON file with OpenAI-style tools the model may call")
    run.add_argument("--tool-choice", default="auto",
                     help="with --tools: auto (default), required, none, or a function's name")
    run.add_argument("--floor", action="store_true",
                     help="after the answer, probe this machine (about a second) and say what share of "
                          "hayate plan's floor the decode reached")
    _add_generation_options(run)
    chat = commands.add_parser("chat", help="interactive chat in the terminal")
    _add_generation_options(chat)
    from hayate.bench.command import add_bench_parser
    from hayate.plan.report import add_plan_parser
    from hayate.pull import add_pull_parsers
    from hayate.serve import add_serve_parser

    add_serve_parser(commands)
    add_pull_parsers(commands)
    add_plan_parser(commands)
    add_bench_parser(commands)
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, deterministic (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="same seed, same text")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json-schema", metavar="FILE", help="answer with JSON that validates against this schema")
    parser.add_argument("--regex", help="answer with text that matches this regex")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per CPU this process may use)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: min(model's, 4096))")
    parser.add_argument("--weights", choices=WEIGHT_MODES, default="auto",
                        help="fp32: dequantize at load; packed: keep GGUF blocks packed; auto: by memory; "
                             "int4-bf16: packed int4 kernels, bf16 activations (fast, lossy; CPU and CUDA)")
    add_device_options(parser)
    add_kv_cache_option(parser)
    add_structured_options(parser)
    add_speculative_options(parser)
    add_vision_options(parser)


def add_vision_options(parser: argparse.ArgumentParser) -> None:
    from hayate.models.vision.precision import VISION_PRECISIONS
    from hayate.multimodal.features import IMAGE_DETAILS

    parser.add_argument("--mmproj", metavar="FILE",
                        help="llama.cpp's image encoder for a .gguf --model (mmproj-*.gguf; SmolVLM)")
    parser.add_argument("--image-detail", choices=IMAGE_DETAILS, default="auto",
                        help="how closely images are looked at, as OpenAI's detail: low = one view at the "
                             "encoder's size (SmolVLM: 64 tokens), high = the model's full tiling, auto "
                             "(default) = low for a picture that fits one view, else high")
    parser.add_argument("--vision-precision", choices=VISION_PRECISIONS, default="fp32",
                        help="the image encoder's matrix products: fp32 (default, exact) or bf16 (about "
                             "2x faster where the CPU has AVX512-BF16 or AMX; rounds, see docs/PERFORMANCE.md)")


def speculative_method(text: str) -> str:
    """--speculative's value: "ngram", or "draft:MODEL" (a path or a pulled name)."""
    if text == "ngram" or (text.startswith("draft:") and len(text) > len("draft:")):
        return text
    raise argparse.ArgumentTypeError(f"expected ngram or draft:MODEL, got {text!r}")


def add_speculative_options(parser: argparse.ArgumentParser) -> None:
    tokens, ngram = EngineConfig.speculative_tokens, EngineConfig.speculative_ngram   # the engine's defaults
    parser.add_argument("--speculative", type=speculative_method, metavar="ngram|draft:MODEL",
                        help="speculative decoding, exact: ngram drafts tokens copied from the prompt and "
                             "answer where their last tokens match; draft:MODEL has a smaller model with the "
                             "same tokenizer draft them; verified in one step (off by default)")
    parser.add_argument("--speculative-tokens", type=int, default=tokens, metavar="K",
                        help=f"with --speculative: most tokens drafted per step (default {tokens})")
    parser.add_argument("--speculative-ngram", type=int, default=ngram, metavar="N",
                        help=f"with --speculative ngram: the longest match tried, then shorter ones (default {ngram})")


def add_structured_options(parser: argparse.ArgumentParser) -> None:
    from hayate.tools.formats import FORMAT_NAMES

    parser.add_argument("--tool-format", choices=FORMAT_NAMES, default="auto",
                        help="how the model writes tool calls (default auto: from its chat template; "
                             "json: hayate's JSON envelope, for templates without tools)")
    parser.add_argument("--grammar-backend", choices=GRAMMAR_BACKENDS, default="auto",
                        help="what fills grammar masks (default auto: xgrammar for the JSON schemas it "
                             "enforces as llguidance does, llguidance for the rest; llguidance: for all)")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights and activations: auto = float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA, run every decode step eagerly instead of replaying captured graphs")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="split every layer over N processes on this machine (torch.distributed, gloo), "
                             "the threads shared out among them (default 1; see docs/SCALING.md)")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="with --tensor-parallel: deal a mixture of experts' experts out whole instead "
                             "of splitting each one")


def parallel_settings(args: argparse.Namespace) -> dict:
    return {"tensor_parallel": args.tensor_parallel, "expert_parallel": args.expert_parallel}


def add_kv_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="KV cache precision: auto = the weights' (float32 on the CPU: exact); "
                             "float16/bfloat16 halve its memory and reading time, lossy")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=list(args.stop), grammar=from_cli(args.json_schema, args.regex))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, mmproj=args.mmproj, threads=args.threads, max_model_len=args.max_model_len,
                        weights=args.weights, device=args.device, dtype=args.dtype,
                        cuda_graphs=not args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
                        tool_format=args.tool_format, grammar_backend=args.grammar_backend,
                        vision_precision=args.vision_precision, show_progress=True,
                        **speculative_settings(args), **parallel_settings(args))


def speculative_settings(args: argparse.Namespace) -> dict:
    method, _, model = (args.speculative or "").partition(":")
    return {"speculative": method or None, "speculative_model": model or None,
            "speculative_tokens": args.speculative_tokens, "speculative_ngram": args.speculative_ngram}


def stream_to_stdout(outputs: Iterator[RequestOutput]) -> RequestOutput | None:
    """Print each text delta as it arrives; return the last output."""
    last = None
    for output in outputs:
        sys.stdout.write(output.text)
        sys.stdout.flush()
        last = output
    sys.stdout.write("\n")
    sys.stdout.flush()
    return last


def summary_line(output: RequestOutput, floor=None) -> str:
    """One line on stderr after an answer; `floor` (a hayate.server.floor.LiveFloor) adds the
    decode's share of this machine's floor."""
    from hayate.llm import decode_rate

    timings = output.timings
    ttft = timings.time_to_first_token
    rate = decode_rate(output.num_output_tokens, timings)
    total = (timings.finished or timings.arrival) - timings.arrival
    cached = f" ({output.num_cached_tokens} cached)" if output.num_cached_tokens else ""
    parts = [f"{output.num_prompt_tokens} prompt tokens{cached}",
             f"time to first token {ttft * 1000:.0f} ms" if ttft is not None else "no token",
             f"{output.num_output_tokens} tokens at {rate:.1f} tokens/s" if rate else f"{output.num_output_tokens} tokens",
             f"total {total:.2f} s", f"({output.finish_reason})"]
    if timings.images is not None:
        parts.insert(1, image_summary(timings.images))
    if timings.speculative is not None:
        counts = timings.speculative
        parts.insert(-2, f"{counts.num_accepted_tokens} of {counts.num_draft_tokens} drafted tokens accepted")
    share = floor.decode_share(output) if floor is not None else None
    if share is not None:
        at_floor = floor.decode_tokens_per_second(output.num_prompt_tokens)
        parts.insert(-2, f"{share:.0%} of this machine's floor ({at_floor:.0f} tokens/s)")
    return " | ".join(parts)


def image_summary(images: ImageTimings) -> str:
    cached = f", {images.encoder_cache_hits} from cache" if images.encoder_cache_hits else ""
    return (f"{images.num_images} image{'s' if images.num_images != 1 else ''} ({images.num_image_tokens} tokens): "
            f"decode {images.load * 1000:.0f} ms, "
            f"preprocess {images.preprocess * 1000:.0f} ms, encode {images.encode * 1000:.0f} ms{cached}")


def user_message(text: str, images: list, detail: str = "auto") -> dict:
    """A user turn: the images (decoded, seen at `detail`), then the text, as vision chat
    examples put them."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image", "image": image, "detail": detail} for image in images),
                                        {"type": "text", "text": text}]}


def command_run(args: argparse.Namespace) -> int:
    from hayate.llm import LLM
    from hayate.multimodal.image import ImageLimits
    from hayate.multimodal.media import load_image_file

    params = sampling_params(args)
    images = [load_image_file(path, ImageLimits()) for path in args.image]   # before the slow load
    tools = read_tools(args.tools) if args.tools else None
    llm = LLM(config=engine_config(args))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [user_message(args.prompt, images, args.image_detail)]
    if tools is not None:
        return run_with_tools(llm, messages, params, tools, args.tool_choice)
    last = stream_to_stdout(llm.stream_chat(messages, params))
    if last is not None:
        print(summary_line(last, measured_floor(llm) if args.floor else None), file=sys.stderr)
    return 0


def measured_floor(llm):
    """hayate plan's floor for the loaded model on this machine (the CPU probed: a second or
    so), as the server measures it; None where the device has no profile."""
    from hayate.server.floor import machine_hardware, measure_floor

    hardware = machine_hardware(llm.engine.runner.device)
    return measure_floor(llm.engine, hardware) if hardware is not None else None


def read_tools(path: str) -> list[dict]:
    import json

    try:
        with open(path, encoding="utf-8") as file:
            tools = json.load(file)
    except ValueError as error:
        raise CliError(f"--tools {path} is not JSON: {error}") from None
    if not isinstance(tools, list):
        raise CliError(f"--tools {path} must hold a JSON list of tools")
    return tools


def run_with_tools(llm, messages: list[dict], params: SamplingParams, tools: list[dict], choice: str) -> int:
    """One answer with tools: its text, then each call as a JSON line."""
    import json

    tool_choice = choice if choice in ("auto", "required", "none") else {"type": "function", "function": {"name": choice}}
    result = llm.chat(messages, params, tools=tools, tool_choice=tool_choice)
    if result.tool_calls:
        for call in result.tool_calls:
            print(json.dumps({"name": call.name, "arguments": json.loads(call.arguments)}, ensure_ascii=False))
    else:
        print(result.text)
    print(f"{len(result.token_ids)} tokens ({result.finish_reason})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hayate.bench.command import command_bench
    from hayate.chat import command_chat
    from hayate.plan.report import command_plan
    from hayate.pull import command_list, command_pull
    from hayate.serve import command_serve

    commands = {"run": command_run, "chat": command_chat, "serve": command_serve, "plan": command_plan,
                "bench": command_bench, "pull": command_pull, "list": command_list}
    try:
        return commands[args.command](args)
    except (ValueError, OSError, CliError) as error:
        print(f"hayate: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RequestFailedError as error:   # a fault inside the engine, not the user's mistake
        print(f"hayate: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
