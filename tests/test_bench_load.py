"""bench/load.py: statistics, SSE parsing, and a run against a fake streaming server."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest

LOAD_PATH = Path(__file__).resolve().parents[1] / "bench" / "load.py"
_spec = importlib.util.spec_from_file_location("bench_load", LOAD_PATH)
load = importlib.util.module_from_spec(_spec)
sys.modules["bench_load"] = load  # dataclasses look their module up here
_spec.loader.exec_module(load)

FAKE_PIECES = ("Hello", " there", "", " friend", "!")  # "" is a chunk with no content
FAKE_TOKENS = 6  # usage says more tokens than content chunks: one chunk carried two


# ---- pure functions ---------------------------------------------------------------------

def test_percentile_matches_linear_interpolation():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert load.percentile(values, 0) == 1.0
    assert load.percentile(values, 50) == 3.0
    assert load.percentile(values, 100) == 5.0
    assert load.percentile(values, 90) == pytest.approx(4.6)
    assert load.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert load.percentile([7.0], 99) == 7.0
    assert load.percentile([], 50) is None
    with pytest.raises(ValueError):
        load.percentile(values, 101)


def test_parse_sse_line():
    assert load.parse_sse_line('data: {"a": 1}\n') == {"a": 1}
    assert load.parse_sse_line('data:{"a": 1}') == {"a": 1}
    assert load.parse_sse_line("data: [DONE]") == load.DONE
    assert load.parse_sse_line("") is None
    assert load.parse_sse_line(": keep-alive") is None
    assert load.parse_sse_line("event: message") is None
    with pytest.raises(ValueError):
        load.parse_sse_line("data: {not json")
    with pytest.raises(ValueError):
        load.parse_sse_line("data: 42")


def test_apply_chunk_records_ttft_gaps_usage_and_groq_timings():
    result = load.RequestResult()
    load.apply_chunk(result, {"choices": [{"delta": {"role": "assistant"}}]}, 0.05)
    load.apply_chunk(result, {"choices": [{"delta": {"content": "Hi"}}]}, 0.10)
    load.apply_chunk(result, {"choices": [{"delta": {"content": " you"}}]}, 0.13)
    load.apply_chunk(result, {"choices": [{"delta": {"content": "!"}, "finish_reason": "stop"}]}, 0.20)
    load.apply_chunk(result, {"choices": [], "usage": {"completion_tokens": 5, "queue_time": 0.01},
                              "x_groq": {"usage": {"total_time": 0.2}}}, 0.21)
    assert result.ttft_s == 0.10
    assert result.chunk_gaps_s == pytest.approx([0.03, 0.07])
    assert result.num_chunks == 3 and result.output_tokens == 5
    assert result.decode_rate() == pytest.approx(4 / 0.10)
    assert result.server_timings == {"queue_time": 0.01, "total_time": 0.2}
    assert result.finish_reason == "stop"
    with pytest.raises(ValueError):
        load.apply_chunk(result, {"error": {"message": "boom"}}, 0.3)


def test_summarize_counts_errors_and_orders_percentiles():
    ok = load.RequestResult(ttft_s=0.1, chunk_gaps_s=[0.01, 0.02, 0.05], latency_s=0.3,
                            num_chunks=4, last_content_s=0.18)
    failed = load.RequestResult(error="HTTP 500: boom", latency_s=0.01)
    level = load.summarize(2, [ok, failed], wall_time_s=0.5)
    assert (level.completed, level.errors, level.output_tokens) == (1, 1, 4)
    assert level.output_tokens_per_s == pytest.approx(8.0)
    assert level.itl_ms.p50 == pytest.approx(20.0)
    assert level.first_error == "HTTP 500: boom"


# ---- a fake OpenAI-compatible streaming server ------------------------------------------

class FakeServer:
    """Minimal HTTP/1.1 server with keep-alive: GET /v1/models and streaming chat completions.

    Every `fail_every`-th chat request (if set) gets a 500."""

    def __init__(self, fail_every: int = 0, finish_reason: str | None = "length"):
        self.fail_every = fail_every
        self.finish_reason = finish_reason  # None: end streams like an interrupted request
        self.chat_requests = 0
        self.max_in_flight = 0
        self.in_flight = 0
        self.payloads: list[dict] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await read_request(reader):
                await self.respond(*request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def respond(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path == "/v1/models":
            return await send_json(writer, 200, {"object": "list", "data": [{"id": "fake-model"}]})
        self.chat_requests += 1
        self.payloads.append(json.loads(body))
        if self.fail_every and self.chat_requests % self.fail_every == 0:
            return await send_json(writer, 500, {"error": {"message": "fake failure"}})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await stream_chunks(writer, self.finish_reason)
        finally:
            self.in_flight -= 1


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return None
    lines = head.decode().split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return method, path, body


async def send_json(writer: asyncio.StreamWriter, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()


async def stream_chunks(writer: asyncio.StreamWriter, finish_reason: str | None) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    events = [{"choices": [{"delta": {"role": "assistant"}}]}]
    events += [{"choices": [{"delta": {"content": piece}}]} for piece in FAKE_PIECES]
    events += [{"choices": [{"delta": {}, "finish_reason": finish_reason}]}]
    events += [{"choices": [], "usage": {"completion_tokens": FAKE_TOKENS, "queue_time": 0.001}}]
    for event in events:
        await asyncio.sleep(0.003)
        await send_chunk(writer, f"data: {json.dumps(event)}\n\n")
    await send_chunk(writer, "data: [DONE]\n\n")
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def send_chunk(writer: asyncio.StreamWriter, text: str) -> None:
    data = text.encode()
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def run_against_fake(fake: FakeServer, **config_fields) -> dict:
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = load.BenchConfig(base_url=f"http://127.0.0.1:{port}/v1", **config_fields)
        return await load.run_benchmark(config)
    finally:
        server.close()


# ---- end to end -------------------------------------------------------------------------

def test_run_benchmark_against_fake_server():
    fake = FakeServer()
    report = asyncio.run(run_against_fake(fake, concurrency_levels=[1, 3], requests=6, max_tokens=16))
    assert report["model"] == "fake-model"
    assert fake.chat_requests == 1 + 6 + 6  # warm-up, then each level
    assert fake.max_in_flight == 3
    sent = fake.payloads[1]
    assert sent["stream"] and sent["temperature"] == 0 and sent["max_tokens"] == 16
    assert sent["stream_options"] == {"include_usage": True}
    for level in report["levels"]:
        assert (level["completed"], level["errors"]) == (6, 0)
        assert level["output_tokens"] == 6 * FAKE_TOKENS
        assert level["output_tokens_per_s"] > 0 and level["requests_per_s"] > 0
        for spread in (level["ttft_ms"], level["itl_ms"], level["e2e_s"]):
            assert 0 < spread["p50"] <= spread["p90"] <= spread["p99"]
        assert level["itl_p99_over_p50"] >= 1
        assert level["decode_tokens_per_s_p50"] > 0
        assert level["server_timings_p50"] == {"queue_time": pytest.approx(0.001)}
    assert "fake-model" in load.format_table(report)


def test_errors_are_counted_not_raised():
    fake = FakeServer(fail_every=3)
    report = asyncio.run(run_against_fake(fake, concurrency_levels=[2], requests=6, max_tokens=8))
    level = report["levels"][0]
    assert level["completed"] + level["errors"] == 6
    assert level["errors"] == 2  # chat requests 3, 6 of 7 (warm-up is request 1) fail
    assert level["first_error"].startswith("HTTP 500")
    assert "first error: HTTP 500" in load.format_table(report)


def test_stream_without_finish_reason_is_an_error():
    report = asyncio.run(run_against_fake(FakeServer(finish_reason=None), concurrency_levels=[1],
                                          requests=2, max_tokens=8))
    level = report["levels"][0]
    assert (level["completed"], level["errors"]) == (0, 2)
    assert "finish_reason" in level["first_error"]


def test_unreachable_url_exits_2(capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = load.main(["--url", f"http://127.0.0.1:{port}/v1", "--requests", "1"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1 and error[0].startswith("load.py: error: cannot reach")


def test_bad_concurrency_is_a_usage_error(capsys):
    assert load.main(["--url", "http://127.0.0.1:1/v1", "--concurrency", "0,2"]) == 2
    assert "--concurrency" in capsys.readouterr().err


def test_serve_compare_table_shows_ratios_and_failures(monkeypatch):
    monkeypatch.syspath_prepend(str(LOAD_PATH.parent))  # serve_compare imports load from its folder
    compare_path = LOAD_PATH.parent / "serve_compare.py"
    spec = importlib.util.spec_from_file_location("bench_serve_compare", compare_path)
    compare = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_serve_compare", compare)
    spec.loader.exec_module(compare)

    def report(tokens_per_s: float, itl_p50: float) -> dict:
        spread = {"p50": itl_p50, "p90": itl_p50, "p99": 2 * itl_p50}
        return {"levels": [{"concurrency": 1, "output_tokens_per_s": tokens_per_s, "errors": 0,
                            "ttft_ms": spread, "itl_ms": spread}]}

    rows = compare.compare_rows({"llama.cpp": report(80.0, 12.0), "hayate": report(40.0, 24.0)})
    ratios = {row[1]: row[-1] for row in rows}  # metric -> hayate / llama.cpp
    assert ratios == {"out tok/s": "0.50", "TTFT p50 ms": "2.00", "ITL p50 ms": "2.00",
                      "ITL p99 ms": "2.00", "errors": "-"}
    failed = compare.compare_table({"llama.cpp": report(80.0, 12.0)}, {"hayate": "no serve command"})
    assert "hayate: FAILED: no serve command" in failed


def test_serve_floor_bare_app_streams_paced_chunks(monkeypatch):
    monkeypatch.syspath_prepend(str(LOAD_PATH.parent))  # serve_floor imports its neighbours
    spec = importlib.util.spec_from_file_location("bench_serve_floor", LOAD_PATH.parent / "serve_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(floor.bare_app(3, 0.001)({"type": "http"}, receive, send))
    assert sent[0]["status"] == 200 and [m.get("body") for m in sent[1:]] == [floor.CHUNK] * 3 + [b"data: [DONE]\n\n"]
    assert sent[-1]["more_body"] is False
    user, system = floor.main_thread_cpu(os.getpid())
    assert user > 0 and system >= 0


def test_serve_relay_turns_each_byte_into_a_chunk(monkeypatch):
    monkeypatch.syspath_prepend(str(LOAD_PATH.parent))
    spec = importlib.util.spec_from_file_location("bench_serve_relay", LOAD_PATH.parent / "serve_relay.py")
    relay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(relay)
    read_end, write_end = os.pipe()
    os.write(write_end, b"ttt" + relay.DONE)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(relay.relay_app(read_end)({"type": "http"}, receive, send))
    finally:
        os.close(read_end)
        os.close(write_end)
    chunk = sys.modules["serve_floor"].CHUNK   # the chunk the bare apps share
    assert [m.get("body") for m in sent[1:]] == [chunk] * 3 + [b"data: [DONE]\n\n"]
