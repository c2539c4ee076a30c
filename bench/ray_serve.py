"""What Ray Serve replicas cost and give on this machine: `hayate serve --ray --replicas 2
--threads 1` against plain `hayate serve`.

1. Start-up: seconds from launching the Ray server to its first healthy /health (target < 90 s).
2. Ray's added time to first token: the same streamed request sent in turns to the Ray server
   and to a plain `hayate serve --threads 1` (one replica's share of the cores), --pairs times;
   the median of the per-pair differences (target <= 25 ms). The idle server sleeps.
3. Throughput: load.py's streaming clients at --users concurrent users, on the 2 replicas,
   then on one plain `hayate serve --threads 2` (output tokens/s of each).

Needs Ray Serve (`pip install -e '.[ray]'`). Usage:

    .venv/bin/python bench/ray_serve.py [--pairs 20] [--users 16] [--requests 48] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

# bench/ is on sys.path: it is this script's folder.
from load import BenchConfig, chat_payload, format_table, run_benchmark, stream_chat
from serve_compare import free_port

HAYATE = Path(sys.executable).parent / "hayate"
PROMPT = "Write a short poem about a lighthouse keeper who has never seen the sea."


@contextmanager
def server(label: str, options: list[str], logs: Path, timeout_s: float = 300) -> Iterator[tuple[str, float]]:
    """`hayate serve OPTIONS` in its own session: (base URL, seconds until healthy); stopped
    with SIGTERM after (the session killed if it lingers)."""
    port = free_port()
    log_path = logs / f"{label}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(HAYATE), "serve", "--port", str(port), "--log-level", "warning", *options],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        yield f"{url}/v1", wait_healthy(url, process, log_path, timeout_s) - started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}); see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server not healthy in {timeout_s} s; see {log_path}")


async def ttft_pairs(ray_url: str, direct_url: str, pairs: int, model: str) -> dict:
    """TTFT (ms) of one streamed request on each server in turn (order alternating)."""
    ray_ms, direct_ms = [], []
    async with httpx.AsyncClient(timeout=120) as client:
        payload = chat_payload(model, PROMPT, 16)
        for url in (ray_url, direct_url):   # warm both
            await stream_chat(client, f"{url}/chat/completions", payload)
        for pair in range(pairs):
            order = [(ray_url, ray_ms), (direct_url, direct_ms)]
            for url, sink in order if pair % 2 == 0 else reversed(order):
                result = await stream_chat(client, f"{url}/chat/completions", payload)
                if result.error or result.ttft_s is None:
                    raise SystemExit(f"request to {url} failed: {result.error}")
                sink.append(result.ttft_s * 1000)
                await asyncio.sleep(0.1)
    added = [r - d for r, d in zip(ray_ms, direct_ms)]
    return {"pairs": pairs, "ray_ttft_ms_p50": statistics.median(ray_ms),
            "direct_ttft_ms_p50": statistics.median(direct_ms), "added_ttft_ms_p50": statistics.median(added)}


def throughput(url: str, label: str, args: argparse.Namespace) -> dict:
    config = BenchConfig(base_url=url, concurrency_levels=[args.users], requests=args.requests,
                         max_tokens=args.max_tokens, label=label)
    report = asyncio.run(run_benchmark(config, progress=lambda line: print(f"  {label}: {line}", file=sys.stderr)))
    print(format_table(report))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="TTFT pairs (default 20)")
    parser.add_argument("--users", type=int, default=16, help="concurrent streaming users (default 16)")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput run (default 48)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="hayate-ray-bench-"))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "logs": str(logs)}
    with server("ray", ["--ray", "--replicas", "2", "--threads", "1"], logs) as (ray_url, startup_s):
        results["ray_startup_s"] = startup_s
        print(f"Ray, 2 replicas x 1 thread: healthy in {startup_s:.1f} s", file=sys.stderr)
        model = httpx.get(f"{ray_url}/models").json()["data"][0]["id"]
        with server("direct-1-thread", ["--threads", "1"], logs) as (direct_url, _):
            results["ttft"] = asyncio.run(ttft_pairs(ray_url, direct_url, args.pairs, model))
        results["ray_2x1"] = throughput(ray_url, "ray 2 replicas x 1 thread", args)
    with server("direct-2-threads", ["--threads", "2"], logs) as (direct_url, _):
        results["direct_1x2"] = throughput(direct_url, "hayate serve --threads 2", args)
    summary = {"ray_startup_s": round(results["ray_startup_s"], 1), **results["ttft"],
               "ray_2x1_output_tokens_per_s": results["ray_2x1"]["levels"][0]["output_tokens_per_s"],
               "direct_1x2_output_tokens_per_s": results["direct_1x2"]["levels"][0]["output_tokens_per_s"]}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**results, "summary": summary}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
