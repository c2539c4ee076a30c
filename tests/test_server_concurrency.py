"""Many clients at once: batched answers equal lone ones, a client that hangs up (streaming,
waiting or not) frees its KV space without disturbing others, and a full queue answers 429."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_harness import tiny_server, wait_until
from tiny_models import make_tiny_model

PROMPTS = [f"Prompt number {i}: {'xyz' * (i % 4)} tell me about item {i * 7}" for i in range(16)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-batch", numbered=False)
    make_tiny_model("llama", folder)
    return folder


def completion_body(prompt: str, max_tokens: int = 16, **extra) -> dict:
    return {"model": "tiny-batch", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra}


def complete(url: str, prompt: str, **extra) -> list[int]:
    response = httpx.post(f"{url}/v1/completions", json=completion_body(prompt, **extra), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def stream_tokens(url: str, body: dict, stop_after: int | None = None, started: threading.Event | None = None):
    """Token ids of a streamed completion; with `stop_after`, hang up after that many chunks."""
    tokens: list[int] = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            tokens += json.loads(line[6:])["choices"][0].get("token_ids", [])
            if started is not None:
                started.set()
            if stop_after is not None and len(tokens) >= stop_after:
                break
    return tokens


def abort_count(server) -> float:
    return server.state.metrics.requests.labels(finish_reason="abort")._value.get()


def test_sixteen_concurrent_greedy_requests_equal_each_alone(tiny_folder):
    server = tiny_server(tiny_folder, max_batch=16)
    try:
        alone = [complete(server.url, prompt) for prompt in PROMPTS]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda prompt: complete(server.url, prompt), PROMPTS))
        assert together == alone
        assert len({tuple(tokens) for tokens in alone}) > 1
    finally:
        server.stop()


def occupancy(stats) -> tuple:
    """What the engine holds: requests and KV blocks (not the running prefix-cache hit rate)."""
    return stats.num_running, stats.num_waiting, stats.kv_cache_usage


@pytest.fixture(scope="module")
def slow_server(tiny_folder):
    """Four batch slots and 10 ms per step, so a 120-token stream lasts over a second."""
    server = tiny_server(tiny_folder, max_batch=4, step_delay=0.01)
    yield server
    server.stop()


def test_client_hanging_up_mid_stream_frees_its_kv_space(slow_server):
    engine = slow_server.state.model.engine
    before, aborts = engine.stats(), abort_count(slow_server)
    others = [completion_body(prompt, max_tokens=120) for prompt in PROMPTS[:3]]
    with ThreadPoolExecutor(3) as pool:
        expected = list(pool.map(lambda body: stream_tokens(slow_server.url, body), others))
        running = [pool.submit(stream_tokens, slow_server.url, body) for body in others]
        assert wait_until(lambda: engine.stats().num_running == 3)
        partial = stream_tokens(slow_server.url, completion_body(PROMPTS[5], max_tokens=120), stop_after=5)
        assert 5 <= len(partial) < 120
        # Freed within a step or so, while the other three are still going.
        assert wait_until(lambda: engine.stats().num_running == 3 and abort_count(slow_server) == aborts + 1, 1.0)
        assert not any(future.done() for future in running)
        assert [future.result() for future in running] == expected
    assert wait_until(lambda: occupancy(engine.stats()) == occupancy(before))


def test_client_hanging_up_while_queued_or_waiting_for_a_whole_answer(tiny_folder):
    server = tiny_server(tiny_folder, max_batch=1, step_delay=0.01)
    engine = server.state.model.engine
    try:
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            long_stream = pool.submit(stream_tokens, server.url, completion_body(PROMPTS[0], max_tokens=200),
                                      None, started)
            assert started.wait(10)
            with pytest.raises(httpx.ReadTimeout):   # queued behind the stream, then hangs up
                httpx.post(f"{server.url}/v1/completions", json=completion_body(PROMPTS[1]), timeout=0.5)
            assert wait_until(lambda: engine.stats().num_waiting == 0, 1.0)
            assert engine.stats().num_running == 1 and not long_stream.done()
            assert len(long_stream.result()) == 200
        # A non-streaming request that is running when its client hangs up is aborted too.
        aborts = abort_count(server)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=completion_body(PROMPTS[2], max_tokens=200), timeout=0.5)
        assert wait_until(lambda: abort_count(server) == aborts + 1 and engine.stats().num_running == 0, 1.0)
        assert engine.stats().kv_cache_usage == 0
    finally:
        server.stop()


def test_full_queue_answers_429_with_retry_after(tiny_folder):
    server = tiny_server(tiny_folder, max_batch=1, max_queue=1, step_delay=0.01)
    engine = server.state.model.engine
    try:
        with ThreadPoolExecutor(2) as pool:
            # One after the other: a request counts as waiting until the engine's next step.
            streams = [pool.submit(stream_tokens, server.url, completion_body(PROMPTS[0], max_tokens=100))]
            assert wait_until(lambda: engine.stats().num_running == 1)
            streams.append(pool.submit(stream_tokens, server.url, completion_body(PROMPTS[1], max_tokens=100)))
            assert wait_until(lambda: engine.stats().num_waiting == 1)
            refused = httpx.post(f"{server.url}/v1/completions", json=completion_body(PROMPTS[2]), timeout=10)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert [len(stream.result()) for stream in streams] == [100, 100]
        assert len(complete(server.url, PROMPTS[2])) == 16
    finally:
        server.stop()
