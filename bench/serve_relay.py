"""The served overhead's floor on this machine: what streaming costs a decode when the HTTP
side does almost nothing and does not even share the engine's process (so no GIL either).

hayate's offline engine runs in one process and writes a byte to a pipe per token; a bare ASGI
app on uvicorn (uvloop, httptools), in a second process, turns each byte into an SSE chunk of
a real chunk's size; a raw-socket client (this script) reads them. Runs alternate between
offline (the engine alone) and served (through the relay); a pair's ratio is the client's ITL
p50 over the offline ITL p50, as in bench/serve_overhead.py, which measures `hayate serve`
the same way. Usage:

    .venv/bin/python bench/serve_relay.py --pairs 20
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

# bench/ is on sys.path: it is this script's folder.
from serve_compare import free_port
from serve_floor import BARE_REQUEST, stream_chunks, wait_for_port
from serve_overhead import gaps_ms, print_pairs, warm_engine

DONE = b"D"


def engine(args: argparse.Namespace) -> None:
    """For each line on stdin ("offline" or "served"), stream --max-tokens greedy tokens, a byte
    to the pipe per token when served; print the run's ITL p50 (ms)."""
    llm, prompt, params = warm_engine(args)
    print("ready", flush=True)
    for line in sys.stdin:
        served, times = line.strip() == "served", []
        for _ in llm.stream(prompt, params):
            times.append(time.perf_counter())
            if served:
                os.write(args.pipe, b"t")
        if served:
            os.write(args.pipe, DONE)
        print(json.dumps(statistics.median(gaps_ms(times[1:]))), flush=True)


def relay_app(pipe: int):
    """The bare ASGI app: every byte read from the pipe becomes one SSE chunk, until DONE."""
    os.set_blocking(pipe, False)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        loop.add_reader(pipe, lambda: [queue.put_nowait(byte) for byte in os.read(pipe, 4096)])
        try:
            await stream_chunks(send, queue, DONE[0])
        finally:
            loop.remove_reader(pipe)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or folder (default: hayate's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--role", choices=["engine", "relay"], help=argparse.SUPPRESS)
    parser.add_argument("--pipe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "engine":
        engine(args)
        return 0
    if args.role == "relay":
        import uvicorn

        uvicorn.run(relay_app(args.pipe), host="127.0.0.1", port=args.port, log_level="error",
                    loop="uvloop", http="httptools")
        return 0
    read_end, write_end = os.pipe()
    port = free_port()
    model = ["--model", args.model] if args.model else []
    worker = subprocess.Popen([sys.executable, __file__, "--role", "engine", "--pipe", str(write_end),
                               "--threads", str(args.threads), "--max-tokens", str(args.max_tokens), *model],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=(write_end,))
    server = subprocess.Popen([sys.executable, __file__, "--role", "relay", "--pipe", str(read_end),
                               "--port", str(port)], pass_fds=(read_end,), stderr=subprocess.DEVNULL)
    try:
        if worker.stdout.readline().strip() != "ready":
            raise SystemExit("the offline engine did not load")
        wait_for_port(port)

        def start(mode: str) -> None:
            worker.stdin.write(f"{mode}\n")
            worker.stdin.flush()

        def offline() -> float:
            start("offline")
            return json.loads(worker.stdout.readline())

        def served() -> float:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(BARE_REQUEST)
                connection.recv(65536)   # the headers: the relay is listening to the pipe
                start("served")
                times = []
                while data := connection.recv(65536):
                    times += [time.perf_counter()] * data.count(b"data: {")
                    if b"[DONE]" in data:
                        break
            worker.stdout.readline()     # the engine's own figure for the run
            return statistics.median(gaps_ms(times[1:]))

        def pair(index: int) -> tuple[float, float]:
            """(offline, relayed) ITL p50, which first alternating."""
            if index % 2 == 0:
                alone = offline()
                return alone, served()
            relayed = served()
            return offline(), relayed

        pair(0)   # warm both
        pairs = [pair(index) for index in range(args.pairs)]
    finally:
        worker.kill()
        server.terminate()
        server.wait()
    print_pairs(pairs, "relayed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
