"""The playground in a real browser: Playwright for Python driving Debian's chromium package
(Playwright's own browser download is not used). Skipped where either is missing.

A tiny model answers with random bytes, so the checks are about the page: the key flow, a
streamed answer with its numbers, stop, a 4xx shown to the user, and an image reaching a tiny
vision model, the schema and tools panes, a phone-sized screen. Each test saves a screenshot in
$HAYATE_SCREENSHOTS, or in a temporary folder where that is unset."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time

import pytest
from PIL import Image

from pathlib import Path

from hayate.llm import LLM
from hayate.server import ServedModel, ServerSettings, create_app
from server_harness import ServerThread, wait_until
from tiny_models import make_tiny_model
from tiny_vlms import make_tiny_vlm

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
KEY = "browser-key"
DESKTOP = {"width": 1200, "height": 800}
PHONE = {"width": 390, "height": 844}
STEP_DELAY = 0.01   # seconds added to every engine step, so an answer can be stopped mid-way


def serve(folder, keys: tuple[str, ...] = ()) -> ServerThread:
    def load() -> ServedModel:
        llm = LLM(str(folder), max_num_seqs=4)
        step = llm.engine.step

        def slow_step():
            time.sleep(STEP_DELAY)
            return step()
        llm.engine.step = slow_step
        return ServedModel.from_llm(llm, max_queue=16)

    # The first load of a fresh checkout builds the native kernels (minutes on 2 cores).
    return ServerThread(create_app(ServerSettings(api_keys=keys), load)).start(timeout=300)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-browser", numbered=False)
    make_tiny_model("llama", folder)
    running = serve(folder, keys=(KEY,))
    assert wait_until(lambda: running.state.metrics.floor is not None, timeout=60)   # probed after start-up
    yield running
    running.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("HAYATE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def page(browser, request):
    """A fresh tab (so a fresh sessionStorage) that records console errors and page errors, on
    a desktop-sized screen unless the test passes another size (indirect parametrization)."""
    context = browser.new_context(viewport=getattr(request, "param", DESKTOP))
    tab = context.new_page()
    tab.errors = []
    tab.on("console", lambda message: tab.errors.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    yield tab
    context.close()


def sign_in(page, server) -> None:
    page.goto(server.url)
    sync_api.expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", KEY)
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#model-name")).to_have_text(server.state.model.name)


def send(page, prompt: str, max_tokens: int) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def stat(page, key: str, index: int = -1) -> str:
    return page.locator(".message.assistant").nth(index).locator(f"[data-stat={key}] dd").text_content()


def test_key_flow_then_a_streamed_answer_with_its_numbers(page, text_server, shots):
    sign_in(page, text_server)
    send(page, "hello there", 16)
    sync_api.expect(page.locator(".message.assistant .stats")).to_be_visible(timeout=30_000)
    assert re.fullmatch(r"[\d.]+ ms", stat(page, "ttft"))
    assert float(stat(page, "tokens-per-second")) > 0
    assert re.fullmatch(r"\d+ in, 16 out", stat(page, "tokens"))
    assert re.fullmatch(r"[\d.]+% of floor", stat(page, "floor-decode"))
    sync_api.expect(page.locator("#live-running")).to_have_text(re.compile(r"^\d+$"), timeout=10_000)
    page.screenshot(path=shots / "answer.png")
    assert page.errors == []


def test_stop_keeps_what_came(page, text_server, shots):
    sign_in(page, text_server)
    page.fill("#seed", "0")   # unseeded, a random model's answer can end in under 4 characters
    send(page, "a long answer", 200)
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    sync_api.expect(page.locator(".message.assistant .content")).to_have_text(re.compile(".{4}"), timeout=30_000)
    page.keyboard.press("Escape")
    sync_api.expect(page.locator(".message.assistant.stopped")).to_have_count(1)
    sync_api.expect(page.locator("#send")).to_be_enabled()
    page.screenshot(path=shots / "stopped.png")


def test_a_4xx_is_shown_and_the_message_given_back(page, text_server, shots):
    sign_in(page, text_server)
    send(page, "too long", 100_000)
    sync_api.expect(page.locator(".message.error")).to_contain_text("context holds 256 tokens")
    assert page.input_value("#prompt") == "too long"
    page.screenshot(path=shots / "error.png")
    assert [error for error in page.errors if "400" not in error] == []   # the browser logs the 400 itself


def test_an_image_reaches_a_tiny_vision_model(page, tmp_path_factory, shots):
    folder = tmp_path_factory.mktemp("tiny-browser-vlm", numbered=False)
    make_tiny_vlm("idefics3", folder)
    server = serve(folder)
    try:
        png = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 30)).save(png, "PNG")
        page.goto(server.url)
        sync_api.expect(page.locator("#attach-label")).to_be_visible()
        page.set_input_files("#attach", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png.getvalue()}])
        send(page, "what is this?", 4)
        sync_api.expect(page.locator(".message.assistant [data-stat=images]")).to_contain_text("encode",
                                                                                               timeout=30_000)
        page.screenshot(path=shots / "image.png")
        assert page.errors == []
    finally:
        server.stop()


def open_pane(page, title: str) -> None:
    page.locator("summary", has_text=title).click()


def test_the_schema_pane_gets_json_and_reset_forgets(page, text_server, shots):
    sign_in(page, text_server)
    open_pane(page, "JSON schema")
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
              "required": ["city"], "additionalProperties": False}
    page.fill("#schema", json.dumps(schema))
    page.fill("#temperature", "1")
    send(page, "where?", 64)
    sync_api.expect(page.locator(".message.assistant .stats")).to_be_visible(timeout=30_000)
    answer = json.loads(page.locator(".message.assistant .content").text_content())
    assert answer["city"] in schema["properties"]["city"]["enum"]
    page.screenshot(path=shots / "schema.png")
    page.click("#reset")
    sync_api.expect(page.locator(".message")).to_have_count(0)
    assert page.errors == []


def test_the_tools_pane_streams_a_call_and_takes_its_result(page, tmp_path_factory, shots):
    folder = tmp_path_factory.mktemp("tiny-browser-tools", numbered=False)
    make_tiny_model("llama", folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1024   # room for the tool envelope's instructions, a byte a token
    (folder / "config.json").write_text(json.dumps(config))
    server = serve(folder)
    try:
        page.goto(server.url)
        open_pane(page, "Tools")
        weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]
        page.fill("#tools", json.dumps(tools))
        page.select_option("#tool-choice", "required")
        # seeded: a random model may keep adding parallel calls until max_tokens cuts one
        page.fill("#seed", "0")
        send(page, "weather in Paris?", 256)
        calls = page.locator(".message.assistant .tool-call")   # parallel calls allowed: one or more
        sync_api.expect(calls.first.locator(".tool-result")).to_be_visible(timeout=30_000)
        for index in range(calls.count()):
            assert calls.nth(index).locator("code").text_content() == "get_weather"
            assert isinstance(json.loads(calls.nth(index).locator("pre").text_content())["city"], str)
        calls.first.locator(".tool-result input").fill("sunny, 21 C")
        calls.first.locator(".tool-result button").click()
        sync_api.expect(page.locator(".message.tool")).to_contain_text("sunny, 21 C")
        page.screenshot(path=shots / "tools.png")
        assert page.errors == []
    finally:
        server.stop()


@pytest.mark.parametrize("page", [PHONE], indirect=True)
def test_readable_on_a_phone(page, text_server, shots):
    sign_in(page, text_server)
    send(page, "hello from a phone", 8)
    sync_api.expect(page.locator(".message.assistant .stats")).to_be_visible(timeout=30_000)
    sync_api.expect(page.locator("#prompt")).to_be_in_viewport()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]   # nothing runs off the side
    page.screenshot(path=shots / "phone.png", full_page=True)
    assert page.errors == []
