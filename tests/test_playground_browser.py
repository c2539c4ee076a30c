"""The playground in a real browser: Playwright for Python driving Debian's chromium package
(Playwright's own browser download is not used). Skipped where either is missing.

A tiny model answers with random bytes, so the checks are about the page: the key flow, a
streamed answer with its numbers, stop, a 4xx shown to the user, and an image reaching a tiny
vision model. Screenshots go to the test's temporary folder."""
from __future__ import annotations

import io
import re
import shutil
import time

import pytest
from PIL import Image

from hayate.llm import LLM
from hayate.server import ServedModel, ServerSettings, create_app
from server_harness import ServerThread, wait_until
from tiny_models import make_tiny_model
from tiny_vlms import make_tiny_vlm

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
KEY = "browser-key"
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

    return ServerThread(create_app(ServerSettings(api_keys=keys), load)).start()


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


@pytest.fixture
def page(browser):
    """A fresh tab (so a fresh sessionStorage) that records console errors and page errors."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
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


def test_key_flow_then_a_streamed_answer_with_its_numbers(page, text_server, tmp_path):
    sign_in(page, text_server)
    send(page, "hello there", 16)
    sync_api.expect(page.locator(".message.assistant .stats")).to_be_visible(timeout=30_000)
    assert re.fullmatch(r"[\d.]+ ms", stat(page, "ttft"))
    assert float(stat(page, "tokens-per-second")) > 0
    assert re.fullmatch(r"\d+ in, 16 out", stat(page, "tokens"))
    assert re.fullmatch(r"[\d.]+% of floor", stat(page, "floor-decode"))
    sync_api.expect(page.locator("#live-running")).to_have_text(re.compile(r"^\d+$"), timeout=10_000)
    page.screenshot(path=tmp_path / "playground.png")
    assert page.errors == []


def test_stop_keeps_what_came(page, text_server):
    sign_in(page, text_server)
    send(page, "a long answer", 200)
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    sync_api.expect(page.locator(".message.assistant .content")).to_have_text(re.compile(".{4}"), timeout=30_000)
    page.keyboard.press("Escape")
    sync_api.expect(page.locator(".message.assistant.stopped")).to_have_count(1)
    sync_api.expect(page.locator("#send")).to_be_enabled()


def test_a_4xx_is_shown_and_the_message_given_back(page, text_server):
    sign_in(page, text_server)
    send(page, "too long", 100_000)
    sync_api.expect(page.locator(".message.error")).to_contain_text("context holds 256 tokens")
    assert page.input_value("#prompt") == "too long"
    assert [error for error in page.errors if "400" not in error] == []   # the browser logs the 400 itself


def test_an_image_reaches_a_tiny_vision_model(page, tmp_path_factory):
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
        assert page.errors == []
    finally:
        server.stop()
