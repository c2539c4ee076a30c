"""What the HTTP server itself costs a streamed token: the CPU that `hayate serve`'s event-loop
thread spends per token, beside a bare ASGI app on the same uvicorn (uvloop, httptools) that
does nothing but stream a chunk of the same size, handed over by a thread through
call_soon_threadsafe at hayate's pace, as hayate's engine thread hands over its tokens.

On a 2-core machine every microsecond the event loop spends is taken from one of the decode
step's two threads, so this bounds how small the served overhead (bench/serve_overhead.py)
can get with this HTTP stack. The two servers run in turns, round by round; CPU times come
from /proc (10 ms ticks: use thousands of tokens). Usage:

    .venv/bin/python bench/serve_floor.py --rounds 3 --tokens 2048
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# bench/ is on sys.path: it is this script's folder.
from serve_compare import free_port
from serve_overhead import http_request, served_gaps, served_model_name

CHUNK = (b'data: {"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk","created":1764400000,'
         b'"model":"SmolLM2-135M-Instruct.Q4_1","choices":[{"index":0,"delta":{"content":" word"},'
         b'"finish_reason":null}]}\n\n')
BARE_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"   # what the bare apps answer


async def stream_chunks(send, queue: asyncio.Queue, end) -> None:
    """The bare apps' response: a CHUNK for every item taken from `queue` until `end`, then [DONE]."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    while await queue.get() != end:
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def bare_app(tokens: int, interval_s: float):
    """An ASGI app: each request streams `tokens` chunks, one every interval_s, each made in a
    producer thread and handed to the event loop as hayate's engine does."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def produce() -> None:
            for index in range(tokens):
                time.sleep(interval_s)
                loop.call_soon_threadsafe(queue.put_nowait, index)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=produce, daemon=True).start()
        await stream_chunks(send, queue, None)
    return app


def main_thread_cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process's main thread."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def stream_cost(pid: int, port: int, request: bytes, tokens: int) -> tuple[float, float, float]:
    """Stream requests until `tokens` tokens came; (user, system) µs per token of the server's
    main thread, and the median gap between tokens (ms)."""
    before, seen, gaps = main_thread_cpu(pid), 0, []
    while seen < tokens:
        request_gaps = served_gaps(port, request)
        gaps += request_gaps
        seen += len(request_gaps) + 1
    after = main_thread_cpu(pid)
    return ((after[0] - before[0]) / seen * 1e6, (after[1] - before[1]) / seen * 1e6, statistics.median(gaps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or folder (default: hayate's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens streamed per server per round")
    parser.add_argument("--bare-server", type=float, default=None, help=argparse.SUPPRESS)   # its interval (ms)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server is not None:
        import uvicorn

        uvicorn.run(bare_app(256, args.bare_server / 1e3), host="127.0.0.1", port=args.port,
                    log_level="error", loop="uvloop", http="httptools")
        return 0
    hayate_port = free_port()
    hayate = shutil.which("hayate", path=str(Path(sys.executable).parent)) or "hayate"
    model = ["--model", args.model] if args.model else []
    server = subprocess.Popen([hayate, "serve", "--threads", str(args.threads), "--port", str(hayate_port), *model],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = None
    try:
        request = http_request(served_model_name(hayate_port), 256)
        served_gaps(hayate_port, request)   # warm
        rows = []
        for _ in range(args.rounds):
            ours = stream_cost(server.pid, hayate_port, request, args.tokens)
            if bare is None:   # paced like hayate's first round
                bare_port = free_port()
                bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(ours[2]),
                                         "--port", str(bare_port)], stderr=subprocess.DEVNULL)
                wait_for_port(bare_port)
            floor = stream_cost(bare.pid, bare_port, BARE_REQUEST, args.tokens)
            rows.append((ours, floor))
            print(f"hayate serve: {sum(ours[:2]):.0f} µs a token (user {ours[0]:.0f}, system {ours[1]:.0f}), "
                  f"ITL p50 {ours[2]:.2f} ms | bare ASGI app: {sum(floor[:2]):.0f} µs (user {floor[0]:.0f}, "
                  f"system {floor[1]:.0f})", flush=True)
    finally:
        for process in (server, bare):
            if process is not None:
                process.terminate()
                process.wait()
    ours_cost = statistics.median(sum(o[:2]) for o, _ in rows)
    floor_cost = statistics.median(sum(f[:2]) for _, f in rows)
    itl = statistics.median(o[2] for o, _ in rows) * 1e3
    print(f"event loop CPU a token, median of {args.rounds} rounds: hayate serve {ours_cost:.0f} µs "
          f"({ours_cost / itl:.1%} of its ITL), bare app {floor_cost:.0f} µs ({floor_cost / itl:.1%})")
    return 0


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the bare ASGI server did not come up") from None
            time.sleep(0.2)


if __name__ == "__main__":
    raise SystemExit(main())
