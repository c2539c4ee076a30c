"""What HTTP and scheduling cost a single stream: hayate's offline engine against `hayate serve`,
request by request.

Both are loaded at once, each in its own process, and requests alternate between them, so
that each pair sees the same phase of a noisy machine; the idle one sleeps. Each request
streams --max-tokens greedy tokens of the same prompt; a pair's ratio is served ITL p50 over
offline ITL p50. The served side is read from a raw socket that only counts `data:` lines, so
the client costs as little as a client can. Usage:

    .venv/bin/python bench/serve_overhead.py --pairs 24
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/ is on sys.path: it is this script's folder.
from serve_compare import free_port

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def warm_engine(args: argparse.Namespace):
    """The offline engine, PROMPT's ids and greedy --max-tokens params, one request run."""
    from hayate.llm import LLM
    from hayate.sampling import SamplingParams

    llm = LLM(args.model, threads=args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompt = llm.encode_chat(PROMPT)
    llm.generate(prompt, params)
    return llm, prompt, params


def offline_worker(args: argparse.Namespace) -> None:
    """For each line on stdin, stream one request and print its gaps (ms) as a JSON list."""
    llm, prompt, params = warm_engine(args)
    print("ready", flush=True)
    for _ in sys.stdin:
        times = [time.perf_counter() for _ in llm.stream(prompt, params)]
        print(json.dumps(gaps_ms(times[1:])), flush=True)   # from the second token on, as served


def gaps_ms(times: list[float]) -> list[float]:
    return [(later - earlier) * 1e3 for earlier, later in zip(times, times[1:])]


def served_gaps(port: int, request: bytes) -> list[float]:
    """One streamed request over a raw socket: the gaps between content chunks (ms), from the
    second token on (the first chunk is the role, the second the first token)."""
    times: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(request)
        while data := connection.recv(65536):
            now = time.perf_counter()
            times += [now] * data.count(b"data: {")
            if b"[DONE]" in data:
                break
    return gaps_ms(times[2:])


def http_request(model_name: str, max_tokens: int) -> bytes:
    body = json.dumps({"model": model_name, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or folder (default: hayate's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        offline_worker(args)
        return 0
    model = ["--model", args.model] if args.model else []
    worker = subprocess.Popen([sys.executable, __file__, "--worker", "--threads", str(args.threads),
                               "--max-tokens", str(args.max_tokens), *model],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = free_port()
    hayate = shutil.which("hayate", path=str(Path(sys.executable).parent)) or "hayate"
    server = subprocess.Popen([hayate, "serve", "--threads", str(args.threads), "--port", str(port), *model],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if worker.stdout.readline().strip() != "ready":
            raise SystemExit("the offline engine did not load")
        request = http_request(served_model_name(port), args.max_tokens)

        def offline() -> list[float]:
            worker.stdin.write("go\n")
            worker.stdin.flush()
            return json.loads(worker.stdout.readline())

        offline(), served_gaps(port, request)   # warm both
        pairs = [(statistics.median(offline()), statistics.median(served_gaps(port, request)))
                 for _ in range(args.pairs)]
    finally:
        worker.kill()
        server.terminate()
        server.wait()
    print_pairs(pairs, "served")
    return 0


def print_pairs(pairs: list[tuple[float, float]], label: str) -> None:
    """The medians of (offline, `label`) ITL p50 pairs, and their ratios' spread."""
    ratios = [other / offline for offline, other in pairs]
    print(f"ITL p50, median of {len(pairs)} pairs: offline {statistics.median(p[0] for p in pairs):.3f} ms, "
          f"{label} {statistics.median(p[1] for p in pairs):.3f} ms")
    print(f"{label} / offline per pair: median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


def served_model_name(port: int) -> str:
    """The id the server lists (it waits until the server answers)."""
    import httpx

    deadline = time.monotonic() + 300
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError):
            if time.monotonic() > deadline:
                raise SystemExit("hayate serve did not come up") from None
            time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
