"""The playground at /: served without a key under a strict Content-Security-Policy, its assets
complete and loadable, everything it fetches still behind the key; and the live floor: the
plan's floor as /metrics gauges and each request's share of it in usage.floor_share."""
from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hayate.llm import LLM
from hayate.plan.hardware import HardwareProfile
from hayate.plan.report import predict
from hayate.server import ServedModel, ServerSettings, create_app
from hayate.server.floor import REFERENCE_CONTEXT, REFERENCE_PROMPT
from hayate.server.playground import ASSETS
from server_harness import ServerThread, wait_until
from tiny_models import make_tiny_model

KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Bytes bound every step of the tiny model at these rates, so the floor is linear in context.
MACHINE = HardwareProfile("a test machine", bandwidth=1e9, flops=1e15)
STATIC = Path(__file__).parent.parent / "hayate" / "server" / "static"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-playground", numbered=False)
    make_tiny_model("llama", folder)
    return folder


def start(folder: Path, hardware=lambda device: MACHINE, keys: tuple[str, ...] = (KEY,),
          healthy: bool = True) -> ServerThread:
    """A server for the tiny model; healthy: wait until it serves (else only start it)."""
    def load() -> ServedModel:
        return ServedModel.from_llm(LLM(str(folder), max_num_seqs=4), max_queue=16)

    server = ServerThread(create_app(ServerSettings(api_keys=keys), load, hardware=hardware))
    if healthy:
        return server.start()
    server.thread.start()
    return server


@pytest.fixture(scope="module")
def server(tiny_folder):
    running = start(tiny_folder)
    assert wait_until(lambda: running.state.metrics.floor is not None, timeout=30)
    yield running
    running.stop()


def samples(server: ServerThread) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def chat(server: ServerThread, **fields) -> httpx.Response:
    body = {"model": server.state.model.name, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def test_page_is_served_without_a_key_under_a_strict_policy(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "require-trusted-types-for 'script'" in policy   # no string can become HTML
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "http" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/playground/app.js">' in page.text
    assert "style=" not in page.text and "<style" not in page.text   # the policy would block them


def test_every_asset_loads_and_every_reference_is_an_asset(server):
    for path, (name, media_type) in ASSETS.items():
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 200, path
        assert response.headers["content-type"] == media_type
        assert response.content == (STATIC / name).read_bytes()
        assert "content-security-policy" in response.headers
    assert sorted(name for name, _ in ASSETS.values()) == sorted(p.name for p in STATIC.iterdir())
    html = (STATIC / "index.html").read_text()
    referenced = {ref for ref in re.findall(r'(?:src|href)="(/[^"]*)"', html)}
    for script in STATIC.glob("*.js"):
        referenced |= {f"/playground/{name}" for name in re.findall(r'from "\./([\w.]+)"', script.read_text())}
    assert referenced and referenced <= set(ASSETS)


def test_model_output_never_becomes_html():
    scripts = "".join(script.read_text() for script in STATIC.glob("*.js"))
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", scripts)


def test_everything_else_stays_behind_the_key(server):
    assert httpx.get(f"{server.url}/playground/auth.json").json() == {"key_required": True}
    for path in ("/playground/config", "/metrics", "/v1/models", "/docs"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
    assert httpx.post(f"{server.url}/", json={}).status_code == 401   # only GET and HEAD are open
    assert httpx.get(f"{server.url}/playground/missing.js").status_code == 401


def test_config_describes_the_served_model(server):
    config = httpx.get(f"{server.url}/playground/config", headers=AUTH).json()
    assert config == {"model": server.state.model.name, "context_window": 256, "accepts_images": False,
                      "max_images": 5, "max_image_bytes": 20 * 2**20}


def test_floor_gauges_are_the_plans_floor(server):
    engine = server.state.model.engine.engine
    model, chunk = engine.runner.model, engine.scheduler.token_budget
    plan = predict(model, model.config, MACHINE, REFERENCE_CONTEXT, chunk, engine.runner.kv_cache.element_size)
    values = samples(server)
    assert values["hayate_decode_floor_tokens_per_second"] == pytest.approx(plan.decode_tokens_per_second, rel=1e-6)
    prefill = REFERENCE_PROMPT / plan.time_to_first_token[REFERENCE_PROMPT]
    assert values["hayate_prefill_floor_tokens_per_second"] == pytest.approx(prefill, rel=1e-6)


def test_usage_and_metrics_carry_the_share_of_the_floor(server):
    answer = chat(server).json()
    share = answer["usage"]["floor_share"]
    assert share["decode"] > 0 and share["prefill"] > 0
    usage = answer["usage"]
    decode_rate = (usage["completion_tokens"] - 1) / usage["completion_time"]
    floor = server.state.metrics.floor
    context = usage["prompt_tokens"] + usage["completion_tokens"] / 2
    assert share["decode"] == pytest.approx(decode_rate / floor.decode_tokens_per_second(context), rel=0.05)
    values = samples(server)
    assert values["hayate_decode_floor_share"] > 0 and values["hayate_prefill_floor_share"] > 0


def test_a_stream_carries_the_share_in_its_usage(server):
    response = chat(server, stream=True, stream_options={"include_usage": True})
    events = [line for line in response.text.splitlines() if line.startswith("data: {")]
    assert '"floor_share":{"decode":' in events[-1]


def test_the_floor_is_measured_before_the_first_request(tiny_folder):
    """The CPU probe would share the cores with the first requests: the loaded model is
    served (health 200) only once the floor is known, and then with its gauges."""
    probing, release = threading.Event(), threading.Event()

    def slow_hardware(device):
        probing.set()
        release.wait(30)
        return MACHINE

    server = start(tiny_folder, hardware=slow_hardware, healthy=False)
    try:
        assert probing.wait(30) and wait_until(lambda: server.server.started, timeout=30)   # loaded, probing
        assert httpx.get(f"{server.url}/health").status_code == 503
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH).status_code == 503
        release.set()
        assert wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200, timeout=30)
        assert "hayate_decode_floor_tokens_per_second" in samples(server)
        assert "floor_share" in chat(server).json()["usage"]
    finally:
        release.set()
        server.stop()


def test_open_server_says_no_key_is_needed(tiny_folder):
    server = start(tiny_folder, hardware=None, keys=())
    try:
        assert httpx.get(f"{server.url}/playground/auth.json").json() == {"key_required": False}
        assert httpx.get(f"{server.url}/playground/config").status_code == 200
        assert "floor" not in "".join(samples(server))   # hardware=None: no floor at all
    finally:
        server.stop()
