"""hayate bench: the command line. hayate loads in this process and each peer in its own;
then they take turns (rounds.py), one request at a time, so that no two engines compete for
the cores and every round sees all of them on the same phase of the machine. With
--background, a busy loop (background.py) shares the cores with every engine's turn."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from hayate.bench.background import BACKGROUNDS, DESCRIPTIONS, background_load
from hayate.bench.offline import HayateContender, build_prompt, plan_floor, plan_lengths, stderr_progress
from hayate.bench.peers import (DEFAULT_LLAMA_PYTHON, PeerFailed, PeerProcess, environment_problem, parse_selection,
                                peer_job)
from hayate.bench.report import BenchReport, notes, results_table, write_json
from hayate.bench.rounds import run_rounds
from hayate.bench.timings import EngineResult, failed
from hayate.cli import add_kv_cache_option, add_speculative_options, speculative_settings
from hayate.config import WEIGHT_MODES
from hayate.cpus import thread_count, usable_cpus

DEFAULT_PROMPT_LENGTHS = "32,512,2048"


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"prompt lengths must be positive, got {text!r}")
    return lengths


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="single-stream speed: time to first token, decode tokens/s, "
                                              "inter-token latency; optionally against llama.cpp and transformers")
    bench.add_argument("--model", help="a .gguf file or a Hugging Face folder (default: the default model)")
    bench.add_argument("--threads", type=int,
                       help="CPU threads for every engine (default: one per CPU this process may use)")
    bench.add_argument("--weights", choices=WEIGHT_MODES, default="auto", help="hayate's weight mode")
    bench.add_argument("--prompt-lengths", type=_lengths, default=_lengths(DEFAULT_PROMPT_LENGTHS),
                       help=f"prompt tokens for time to first token (default {DEFAULT_PROMPT_LENGTHS})")
    bench.add_argument("--decode-tokens", type=int, default=256, help="tokens decoded after the first (256)")
    bench.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians reported (3)")
    bench.add_argument("--compare", default="", help="peers on the same file and threads: llama.cpp,transformers")
    bench.add_argument("--json", type=Path, help="write every figure (and each ITL sample) here")
    bench.add_argument("--plot", type=Path, help="write a PNG: tokens/s bars and ITL distributions")
    bench.add_argument("--full-transformers", action="store_true",
                       help="transformers at every prompt length and all decode tokens "
                            "(default: prompts up to 512 tokens, 64 decode tokens)")
    bench.add_argument("--llama-python", type=Path, default=DEFAULT_LLAMA_PYTHON,
                       help="the Python that has llama-cpp-python (default: .venv-bench, made by `make bench-env`)")
    bench.add_argument("--background", choices=BACKGROUNDS, default="none",
                       help="a busy loop beside every engine while it is measured: at nice 19 (nice19) "
                            "or at normal priority (busy); default none")
    bench.add_argument("--peer-timeout", type=float, default=1800, help="seconds allowed per peer (1800)")
    add_kv_cache_option(bench)
    add_speculative_options(bench)


def load_hayate(args: argparse.Namespace) -> HayateContender:
    from hayate.llm import LLM

    start = time.perf_counter()
    # No prefix caching: every repeat must prefill its whole prompt, as the peers do.
    llm = LLM(args.model, threads=args.threads, weights=args.weights, kv_cache_dtype=args.kv_cache_dtype,
              show_progress=True, prefix_caching=False, **speculative_settings(args))
    return HayateContender(llm, args.decode_tokens, time.perf_counter() - start)


def start_peers(names: list[str], job: dict,
                args: argparse.Namespace) -> tuple[list[PeerProcess], dict[str, EngineResult]]:
    """Each peer's worker, loaded one after the other; those that cannot run, as results."""
    started, unavailable = [], {}
    for name in names:
        problem = environment_problem(name, Path(job["model"]), args.llama_python)
        if problem:
            stderr_progress(f"bench: {name} skipped: {problem}")
            unavailable[name] = failed(name, problem, status="skipped")
            continue
        stderr_progress(f"bench: {name}: loading in its own process")
        try:
            started.append(PeerProcess(peer_job(name, job, args.decode_tokens, args.llama_python,
                                                args.full_transformers), args.peer_timeout, echo=stderr_progress))
        except (PeerFailed, OSError) as error:
            stderr_progress(f"bench: {name} failed: {error}")
            unavailable[name] = failed(name, str(error))
    return started, unavailable


def warn_if_busy() -> float:
    """Other work on the cores makes every figure noisy, the multi-threaded ones most."""
    load = os.getloadavg()[0]
    if load > 0.5:
        stderr_progress(f"bench: warning: load average {load:.1f} on {usable_cpus().describe()} before the run: "
                        "other processes are busy, figures will be noisy")
    return load


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before the (long) run, not after it."""
    for path in (args.json, args.plot):
        if path is not None and not path.resolve().parent.is_dir():
            raise ValueError(f"cannot write {path}: no such folder {path.resolve().parent}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install 'hayate[bench]'")


def show(report: BenchReport, args: argparse.Namespace) -> None:
    console = Console(width=None if sys.stdout.isatty() else 140)   # piped: don't squeeze to 80 columns
    console.print(results_table(report))
    for line in notes(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if args.json:
        write_json(report, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        from hayate.bench.plot import draw_png   # matplotlib only when a plot is asked for

        background = "" if report.background == "none" else f", background {report.background}"
        draw_png(report.engines, args.plot, f"{Path(report.model).name}, {report.threads} threads{background}")
        console.print(f"wrote {args.plot}")


def command_bench(args: argparse.Namespace) -> int:
    peer_names = parse_selection(args.compare)
    if args.decode_tokens < 1 or args.repeats < 1:
        raise ValueError("--decode-tokens and --repeats must be at least 1")
    check_outputs(args)
    load_average = warn_if_busy()
    hayate = load_hayate(args)
    llm = hayate.llm
    plan = plan_lengths(args.prompt_lengths, args.decode_tokens, args.repeats, llm.engine.max_model_len)
    prompts = {length: build_prompt(llm.tokenizer, length) for length in plan.prompt_lengths}
    decode_prompt = build_prompt(llm.tokenizer, plan.decode_prompt_length)
    job = {"model": str(llm.model_path), "threads": thread_count(args.threads),
           "n_ctx": llm.engine.max_model_len}
    peers, unavailable = start_peers(peer_names, job, args)
    if args.background != "none":
        stderr_progress(f"bench: background load while measuring: {DESCRIPTIONS[args.background]}")
    try:
        with background_load(args.background):
            measured = run_rounds([hayate, *peers], prompts, decode_prompt, plan.repeats, stderr_progress)
    finally:
        for peer in peers:
            peer.close()
    by_name = {**unavailable, **{result.name: result for result in measured}}
    stderr_progress("bench: probing this CPU for the plan's floor")
    floor = plan_floor(llm, args.threads, plan)
    engines = [by_name[hayate.name], *(by_name[name] for name in peer_names)]
    show(BenchReport(job["model"], job["threads"], args.weights, plan, engines, floor, load_average,
                     args.kv_cache_dtype, args.background, args.speculative), args)
    return 0
