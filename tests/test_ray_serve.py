"""hayate serve --ray without Ray: option checks, prefix hashing and the ingress relay's failure
framing, with fake replicas. The replicas themselves are tests/test_ray_replicas.py's."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from hayate.cli import build_parser, main
from hayate.config import EngineConfig
from hayate.scale.options import RayOptions, autoscaling_config, ray_options
from hayate.scale.prefix import PREFIX_CHARS, prefix_key, rank_replicas
from hayate.scale.ray_serve import ServeSpec, model_options
from hayate.scale.relay import ForwardedRequest, Relay, ResponseEnd, ResponseStart, run_app
from hayate.server import ServerSettings

KEY = "sk-ray-test"
MODEL = "SmolLM2-135M-Instruct.Q4_1"


def serve_args(*options: str):
    return build_parser().parse_args(["serve", *options])


# ---- options ----------------------------------------------------------------------------

def test_ray_options_parse_counts_auto_and_defaults():
    assert ray_options(serve_args()) is None
    assert ray_options(serve_args("--ray")) == RayOptions(replicas=1)
    options = ray_options(serve_args("--ray", "--replicas", "auto", "--routing", "prefix", "--threads", "2"))
    assert options.autoscaled and options.routing == "prefix" and options.replica_threads(8) == 2
    assert ray_options(serve_args("--ray", "--replicas", "3")).replica_threads(8) == 2   # 8 CPUs // 3
    assert ray_options(serve_args("--ray", "--replicas", "4")).replica_threads(2) == 1


@pytest.mark.parametrize("options, message", [
    (["--ray", "--replicas", "0"], "--replicas must be >= 1"),
    (["--ray", "--replicas", "two"], "--replicas must be a number or auto"),
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--routing", "prefix"], "--routing needs --ray"),
    (["--ray-address", "auto"], "--ray-address needs --ray"),
    (["--ray", "--device", "cuda"], "--ray runs replicas on the CPU"),
])
def test_bad_ray_options_are_one_clear_error(options, message, capsys):
    with pytest.raises(ValueError, match=message):
        ray_options(serve_args(*options))
    assert main(["serve", *options, "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hayate: error:") and message in err[0]


def test_ray_refuses_tensor_parallel():
    with pytest.raises(ValueError, match="--ray and --tensor-parallel"):
        ray_options(serve_args("--ray", "--tensor-parallel", "2"))


def test_autoscaling_goes_from_one_replica_to_what_the_cpus_hold():
    config = autoscaling_config(max_batch=16, cluster_cpus=8, threads=2)
    assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"]) == (1, 4, 8)
    assert autoscaling_config(max_batch=1, cluster_cpus=1, threads=4)["max_replicas"] == 1


def test_replicas_get_their_threads_as_ray_cpus_and_hayates_batch_and_queue():
    spec = ServeSpec(ServerSettings(), EngineConfig(max_num_seqs=16), max_queue=64, host="127.0.0.1", port=0,
                     shutdown_timeout=5.0)
    fixed = model_options(spec, RayOptions(replicas=2), threads=1, cluster_cpus=2)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1} and fixed["max_ongoing_requests"] == 16 + 64
    scaled = model_options(spec, RayOptions(replicas=None), threads=1, cluster_cpus=2)
    assert "num_replicas" not in scaled and scaled["autoscaling_config"]["max_replicas"] == 2


# ---- prefix routing ---------------------------------------------------------------------

def chat_body(*contents: str, system: str = "You are a terse assistant.") -> bytes:
    messages = [{"role": "system", "content": system}] + [{"role": "user", "content": c} for c in contents]
    return json.dumps({"model": MODEL, "messages": messages}).encode()


def test_prefix_key_is_the_start_of_the_request_text():
    long_system = "Answer as a pirate. " * 40    # longer than the key
    assert prefix_key(chat_body("a", system=long_system)) == prefix_key(chat_body("b", system=long_system))
    assert len(prefix_key(chat_body("a", system=long_system))) == PREFIX_CHARS
    assert prefix_key(chat_body("first question")) != prefix_key(chat_body("second question"))
    assert prefix_key(chat_body("hi", "more")).startswith(prefix_key(chat_body("hi"))[:40])
    assert prefix_key(b'{"model": "m", "prompt": ["Once upon", "x"]}') == "Once upon"
    assert prefix_key(b'{"model": "m", "prompt": [1, 2, 3]}') == "1 2 3"
    for body in (b"not json", b"[1, 2]", b'{"model": "m"}'):
        assert prefix_key(body) is None


def test_rendezvous_ranking_is_stable_and_moves_only_a_leaving_replicas_keys():
    replicas = ["r1", "r2", "r3"]
    keys = [f"conversation {i}" for i in range(300)]
    before = {key: rank_replicas(key, replicas)[0] for key in keys}
    assert before == {key: rank_replicas(key, list(reversed(replicas)))[0] for key in keys}
    assert set(before.values()) == set(replicas)        # every replica gets keys
    after = {key: rank_replicas(key, ["r1", "r3"])[0] for key in keys}
    assert all(after[key] == before[key] for key in keys if before[key] != "r2")


# ---- the relay, with fake replicas --------------------------------------------------------

class FakeLost(Exception):
    """Stands for Ray's actor-died error."""


SSE = [(b"content-type", b"text/event-stream")]


def fake_replica(plan: list):
    """open_stream for Relay: each call takes the next script from `plan`; a script yields
    its items, raising any exception among them."""
    def open_stream(request: ForwardedRequest):
        async def stream():
            for item in plan.pop(0):
                if isinstance(item, Exception):
                    raise item
                yield item
        return stream()
    return open_stream


def relay_post(relay: Relay, body: dict) -> httpx.Response:
    async def post():
        transport = httpx.ASGITransport(app=relay)
        async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
            return await client.post("/v1/chat/completions", json=body)
    return asyncio.run(post())


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_a_stream_cut_mid_answer_ends_with_an_error_event_and_done():
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
    relay = Relay(fake_replica([[ResponseStart(200, SSE), chunk, chunk, FakeLost("actor died")]]), (FakeLost,))
    events = sse_events(relay_post(relay, {"stream": True}).text)
    assert len(events) == 4 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "replica_lost" and "actor died" in error["message"]


def test_a_stream_that_stops_without_its_end_mark_is_cut_too():
    relay = Relay(fake_replica([[ResponseStart(200, SSE), b"data: {}\n\n"]]), (FakeLost,))
    events = sse_events(relay_post(relay, {"stream": True}).text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "replica_lost"


def test_a_request_whose_replica_dies_before_answering_is_retried():
    answer = [ResponseStart(200, [(b"content-type", b"application/json")]), b'{"ok": true}', ResponseEnd()]
    relay = Relay(fake_replica([[FakeLost("gone")], [ResponseStart(200), FakeLost("gone")], answer]),
                  (FakeLost,), backoff_s=0)
    response = relay_post(relay, {})
    assert response.status_code == 200 and response.json() == {"ok": True}


def test_no_replica_left_is_a_503_in_openai_format():
    relay = Relay(fake_replica([[FakeLost("gone")] for _ in range(3)]), (FakeLost,), attempts=3, backoff_s=0)
    response = relay_post(relay, {})
    assert response.status_code == 503 and response.json()["error"]["code"] == "replica_unavailable"


def test_the_openai_client_raises_the_error_event():
    chunk = b'data: {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", ' \
            b'"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
    relay = Relay(fake_replica([[ResponseStart(200, SSE), chunk, FakeLost("actor died")]]), (FakeLost,))
    client = openai.OpenAI(base_url="http://relay/v1", api_key="k", max_retries=0,
                           http_client=httpx.Client(transport=SyncASGI(relay)))
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError, match="stopped mid-answer"):
        for _ in stream:
            pass


class SyncASGI(httpx.BaseTransport):
    """A sync httpx transport over an ASGI app (the openai client is sync)."""

    def __init__(self, app):
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app)) as client:
                response = await client.send(httpx.Request(request.method, request.url, headers=request.headers,
                                                           content=request.read()))
                return response.status_code, response.headers, await response.aread()
        status, headers, content = asyncio.run(send())
        return httpx.Response(status, headers=headers, content=content)


def test_run_app_streams_an_apps_response_and_tells_it_when_the_caller_leaves():
    seen_disconnect = asyncio.Event()

    async def numbers(request):
        async def body():
            for number in range(100):
                yield f"{number}\n"
                await asyncio.sleep(0)
        return StreamingResponse(body(), media_type="text/plain")

    async def echo(request):
        return JSONResponse({"body": (await request.body()).decode(), "path": request.url.path})

    async def wait(request):
        await request.body()
        message = await request.receive()
        assert message["type"] == "http.disconnect"
        seen_disconnect.set()
        return JSONResponse({})

    app = Starlette(routes=[Route("/numbers", numbers), Route("/echo", echo, methods=["POST"]), Route("/wait", wait)])

    async def scenario():
        echo_items = [item async for item in run_app(app, request("POST", "/echo", b"hello"), [(b"x-r", b"1")])]
        assert isinstance(echo_items[0], ResponseStart) and (b"x-r", b"1") in echo_items[0].headers
        assert json.loads(echo_items[1]) == {"body": "hello", "path": "/echo"}
        assert isinstance(echo_items[-1], ResponseEnd)
        numbers_items = [item async for item in run_app(app, request("GET", "/numbers"))]
        assert b"".join(i for i in numbers_items if isinstance(i, bytes)).count(b"\n") == 100
        reader = asyncio.create_task(anext(run_app(app, request("GET", "/wait"))))
        await asyncio.sleep(0.05)
        reader.cancel()   # as Ray cancels a replica's call when its caller goes
        await asyncio.gather(reader, return_exceptions=True)
        await asyncio.wait_for(seen_disconnect.wait(), 5)

    asyncio.run(scenario())


def request(method: str, path: str, body: bytes = b"") -> ForwardedRequest:
    return ForwardedRequest(method, path, b"", [(b"content-type", b"application/json")], body)
