"""Every bad request gets the right 4xx, in OpenAI's error format, quickly, and the server keeps
serving; API keys; 503 while loading or after the engine stopped."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from hayate.llm import LLM
from hayate.server import ServedModel, ServerSettings, create_app
from server_harness import ServerThread, tiny_server
from tiny_models import make_tiny_model

MODEL = "tiny-errors"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp(MODEL, numbered=False)
    make_tiny_model("llama", folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder):
    running = tiny_server(tiny_folder)
    yield running
    running.stop()


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


CHAT_ERRORS = [
    (chat_body(max_tokens=-1), 400, "max_tokens"),
    (chat_body(max_tokens=0), 400, "max_tokens"),
    (chat_body(max_tokens=10**9), 400, "max_tokens"),
    (chat_body(max_completion_tokens=10**9), 400, "max_tokens"),
    (chat_body(n=10**6), 400, "n"),
    (chat_body(n=0), 400, "n"),
    (chat_body(messages=[{"role": "user", "content": "x" * 300}]), 400, "messages"),
    (chat_body(messages="hi"), 400, "messages"),
    (chat_body(messages=[]), 400, "messages"),
    (chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    (chat_body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    (chat_body(temperature="hot"), 400, "temperature"),
    (chat_body(temperature=-1), 400, "temperature"),
    (chat_body(top_p=0), 400, "top_p"),
    (chat_body(presence_penalty=5), 400, "presence_penalty"),
    (chat_body(n="2"), 400, "n"),
    (chat_body(stream="yes"), 400, "stream"),
    (chat_body(stop=5), 400, "stop"),
    (chat_body(stop=["s"] * 17), 400, "stop"),
    (chat_body(seed=1.5), 400, "seed"),
    (chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (chat_body(top_logprobs=2), 400, "top_logprobs"),
    (chat_body(logit_bias={"99999": 1}), 400, "logit_bias"),
    (chat_body(logit_bias={"5": 1000}), 400, "logit_bias"),
    (chat_body(tools=[{"type": "function", "function": {"name": "bad name"}}]), 400, "tools[0].function.name"),
    (chat_body(response_format={"type": "xml"}), 400, "response_format"),
    (chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), 400, "messages[0].content[0]"),
    (chat_body(model="gpt-4o"), 404, "model"),
    ({"messages": HI}, 400, "model"),
]


@pytest.mark.parametrize("body, status, param", CHAT_ERRORS)
def test_invalid_chat_requests(server, body, status, param):
    started = time.perf_counter()
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10)
    assert time.perf_counter() - started < 2.0
    assert_error(response, status, param)


def test_specific_messages(server):
    url = f"{server.url}/v1/chat/completions"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert "does not accept images" in assert_error(httpx.post(url, json=chat_body(messages=image)), 400)["message"]
    long_prompt = chat_body(messages=[{"role": "user", "content": "x" * 300}])
    assert_error(httpx.post(url, json=long_prompt), 400, code="context_length_exceeded")
    unknown = assert_error(httpx.post(url, json=chat_body(model="gpt-4o")), 404, code="model_not_found")
    assert MODEL in unknown["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ({"model": MODEL, "prompt": [10**6]}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": "x" * 300}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": ["hi"] * 100}, "prompt"),
])
def test_invalid_completion_requests(server, body, param):
    assert_error(httpx.post(f"{server.url}/v1/completions", json=body, timeout=10), 400, param)


def test_malformed_json_and_wrong_content(server):
    url = f"{server.url}/v1/chat/completions"
    bad_json = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_error(bad_json, 400)["message"]
    assert_error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url, content=b"model=x", headers={"content-type": "text/plain"}), 400)
    assert_error(httpx.post(url), 400)


def test_oversized_bodies_get_413(server):
    url = f"{server.url}/v1/chat/completions"
    cap = ServerSettings().max_body_bytes
    huge = b'{"model": "' + b"x" * (cap + 1024) + b'"}'
    started = time.perf_counter()
    assert_error(httpx.post(url, content=huge, headers={"content-type": "application/json"}), 413)

    def chunked():   # no Content-Length: the cap is enforced while reading
        for _ in range(cap // (1024 * 1024) + 2):
            yield b"x" * (1024 * 1024)

    assert_error(httpx.post(url, content=chunked(), headers={"content-type": "application/json"}), 413)
    assert time.perf_counter() - started < 10


def test_unknown_route_and_method(server):
    assert_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)
    assert_error(httpx.get(f"{server.url}/v1/chat/completions"), 405)


def test_server_keeps_serving_after_errors(server):
    for body, _, _ in CHAT_ERRORS[:5]:
        httpx.post(f"{server.url}/v1/chat/completions", json=body)
    response = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(), timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.state.model.engine.is_alive


def test_api_keys(tiny_folder):
    server = tiny_server(tiny_folder, settings=ServerSettings(api_keys=("key-one", "key-two")))
    try:
        url = f"{server.url}/v1/chat/completions"
        assert httpx.get(f"{server.url}/health").status_code == 200   # open for probes
        assert_error(httpx.post(url, json=chat_body()), 401, code="invalid_api_key")
        assert_error(httpx.post(url, json=chat_body(), headers={"Authorization": "Bearer wrong"}), 401)
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
            assert_error(httpx.get(f"{server.url}{path}"), 401)
            assert httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer key-one"}).status_code == 200
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-two", max_retries=0)
        assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.stop()


def test_503_while_loading_then_ready(tiny_folder):
    release = threading.Event()

    def slow_load() -> ServedModel:
        release.wait(30)
        return ServedModel.from_llm(LLM(str(tiny_folder)), max_queue=4)

    server = ServerThread(create_app(ServerSettings(), slow_load))
    server.thread.start()
    try:
        assert _wait_for_status(f"{server.url}/health", 503)
        assert httpx.get(f"{server.url}/health").json()["status"] == "loading"
        assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=chat_body()), 503)
        assert_error(httpx.get(f"{server.url}/v1/models"), 503)
        release.set()
        assert _wait_for_status(f"{server.url}/health", 200)
        assert httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(), timeout=30).status_code == 200
    finally:
        release.set()
        server.stop()


def test_503_after_the_engine_stops(tiny_folder):
    server = tiny_server(tiny_folder)
    try:
        server.state.model.engine.shutdown()
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=chat_body()), 503)
    finally:
        server.stop()


def _wait_for_status(url: str, status: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url).status_code == status:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False
