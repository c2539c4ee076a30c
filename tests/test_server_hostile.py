"""Hostile requests: out-of-range numbers, invalid Unicode, pathological bodies, a request whose
step faults, and a shutdown mid-stream. Each gets its 4xx (or its own 500 / error event) in
OpenAI's format, and the server goes on answering everyone else exactly as before."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from hayate.sampling import MAX_LOGIT_BIAS, MAX_TOP_K
from hayate.server.limits import MAX_JSON_VALUES, body_problem
from hayate.server.protocol import MAX_CONTENT_PARTS, MAX_MESSAGES
from server_harness import tiny_server, wait_until
from test_engine_isolation import POISON_SEED, poison_sampler
from test_server_errors import MODEL, assert_error, chat_body
from tiny_models import make_tiny_model

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / MODEL    # served under the name test_server_errors uses
    make_tiny_model("llama", folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder):
    """Serves the tiny model; a request seeded with POISON_SEED faults in sampling."""
    running = tiny_server(tiny_folder, prepare=poison_sampler)
    yield running
    running.stop()


def chat(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30, **kwargs)


def post_raw(server, path: str, raw: bytes | str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(f"{server.url}{path}", content=raw, headers=JSON, timeout=30)
    return response, time.perf_counter() - started


def reference_answer(server) -> dict:
    response = chat(server, chat_body(temperature=0, max_tokens=8))
    assert response.status_code == 200
    return response.json()["choices"][0]


OUT_OF_RANGE = [
    ("top_k", 2**64), ("top_k", 2**63), ("top_k", MAX_TOP_K + 1), ("top_k", -2), ("top_k", 1e20),
    ("seed", 2**64), ("seed", -(2**63) - 1), ("temperature", 2.5), ("temperature", 1e308),
    ("top_p", 1.5), ("min_p", 2), ("presence_penalty", -3), ("frequency_penalty", 2.5),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("n", 129), ("max_tokens", 2**70),
    ("top_logprobs", 21), ("logit_bias", {"5": 101}), ("logit_bias", {"²": 1}), ("logit_bias", {"-1": 1}),
    ("logit_bias", {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), ("stop", ["x" * 1025]),
]


@pytest.mark.parametrize("field, value", OUT_OF_RANGE, ids=[f"{f}={str(v)[:12]}" for f, v in OUT_OF_RANGE])
def test_out_of_range_numbers_are_400_naming_the_field(server, field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    error = assert_error(chat(server, chat_body(**{field: value}, **extra)), 400)
    param = "max_tokens" if field == "max_completion_tokens" else field
    assert error["param"] == param, error


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(server, literal):
    for field in ("temperature", "presence_penalty", "repetition_penalty"):
        raw = json.dumps(chat_body())[:-1] + f', "{field}": {literal}}}'
        assert_error(post_raw(server, "/v1/chat/completions", raw)[0], 400, field)


def test_the_batch_survives_every_bad_value(server):
    before = reference_answer(server)
    for field, value in OUT_OF_RANGE:
        chat(server, chat_body(**{field: value}))
    assert reference_answer(server) == before
    assert server.state.model.engine.is_alive


UNPAIRED = [
    ('{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL, "messages[0].content"),
    ('{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}' % MODEL,
     "messages[0].content[0].text"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}' % MODEL, "stop[0]"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "user": "\\udc00\\ud800"}' % MODEL, "user"),
]


@pytest.mark.parametrize("raw, param", UNPAIRED)
def test_unpaired_surrogates_are_400(server, raw, param):
    error = assert_error(post_raw(server, "/v1/chat/completions", raw)[0], 400, param, code="invalid_unicode")
    assert "surrogate" in error["message"]


def test_invalid_text_in_completions_and_bytes(server):
    for prompt, param in (('"\\ud800"', "prompt"), ('["ok", "\\ud800"]', "prompt[1]")):
        raw = '{"model": "%s", "prompt": %s, "max_tokens": 2}' % (MODEL, prompt)
        assert_error(post_raw(server, "/v1/completions", raw)[0], 400, param, code="invalid_unicode")
    raw = b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe", "max_tokens": 2}'
    error = assert_error(post_raw(server, "/v1/completions", raw)[0], 400, code="invalid_unicode")
    assert "UTF-8" in error["message"]


def test_valid_pairs_and_escaped_backslashes_pass(server):
    for text in ('\\ud83d\\ude00 ok', '\\\\ud800 is only text'):
        raw = '{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "max_tokens": 2}' % (MODEL, text)
        assert post_raw(server, "/v1/chat/completions", raw)[0].status_code == 200


def hostile_bodies() -> list[tuple[str, bytes | str, int]]:
    many = MAX_JSON_VALUES + 10
    return [
        ("/v1/completions", '{"model": "%s", "prompt": "%s"}' % (MODEL, "a" * 30_000_000), 400),
        ("/v1/completions", '{"model": "%s", "prompt": [%s]}' % (MODEL, ",".join(["1"] * many)), 400),
        ("/v1/chat/completions", '{"x": [%s]}' % ",".join(["[]"] * many), 400),
        ("/v1/chat/completions", '{"x": {%s}}' % ",".join(f'"{i}":0' for i in range(many)), 400),
        ("/v1/chat/completions", "[" * 200_000 + "]" * 200_000, 400),
        ("/v1/chat/completions", json.dumps(chat_body(messages=[{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1))), 400),
        ("/v1/chat/completions", json.dumps(chat_body(messages=[{"role": "user", "content": [
            {"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)}])), 400),
        ("/v1/chat/completions", json.dumps(chat_body(logit_bias={str(i): 1 for i in range(100_000)})), 400),
        ("/v1/chat/completions", b'{"model": "' + b"x" * (33 * 1024 * 1024) + b'"}', 413),
    ]


def test_hostile_bodies_are_refused_quickly(server):
    before = reference_answer(server)
    for path, raw, status in hostile_bodies():
        response, seconds = post_raw(server, path, raw)
        assert_error(response, status)
        assert seconds < 2.0, (path, str(raw[:40]), seconds)   # parsing them whole took 2-4 s
    assert reference_answer(server) == before


def test_body_values_are_counted_before_parsing():
    assert body_problem(b'{"a": [1, 2, 3]}') is None
    message, param, code = body_problem(b"[" + b"[]," * MAX_JSON_VALUES + b"[]]")
    assert code == "request_too_complex" and param is None and str(MAX_JSON_VALUES) in message


def test_a_request_that_faults_fails_alone(server):
    before = reference_answer(server)
    poisoned = chat_body(temperature=1.0, seed=POISON_SEED, max_tokens=6)
    results: dict[str, httpx.Response] = {}

    def send(name, body):
        results[name] = chat(server, body)

    threads = [threading.Thread(target=send, args=(f"ok-{i}", chat_body(temperature=0, max_tokens=8)))
               for i in range(3)] + [threading.Thread(target=send, args=("bad", poisoned))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_error(results["bad"], 500, code="internal_error")
    assert all(results[f"ok-{i}"].json()["choices"][0] == before for i in range(3))
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**poisoned, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-1][len("data: "):])["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.state.model.engine.stats().kv_cache_usage == 0


def test_streams_cut_by_shutdown_end_with_an_error_event(tiny_folder):
    server = tiny_server(tiny_folder, step_delay=0.05, shutdown_timeout=1.0)
    events: list[str] = []
    started = threading.Event()

    def read() -> None:
        body = chat_body(max_tokens=200, ignore_eos=True, stream=True)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    server.stop()
    reader.join(30)
    assert not reader.is_alive() and len(events) > 1
    error = json.loads(events[-1])["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error"
    assert wait_until(lambda: not server.thread.is_alive())
