"""Images over HTTP on a tiny random SmolVLM-shaped model: the official openai client sends
image_url parts and gets the offline answer; hostile images each get their 4xx quickly, and
the server keeps serving."""
from __future__ import annotations

import base64

import httpx
import openai
import pytest

from hayate.llm import LLM
from hayate.multimodal.image import ImageLimits, decode_image
from hayate.multimodal.media import MediaPolicy
from hayate.sampling import SamplingParams
from hayate.server import ServerSettings
from image_samples import data_uri, encode, noise, png_with_header_only
from server_harness import tiny_server
from test_server_errors import assert_error
from tiny_vlms import make_tiny_vlm

MODEL = "tiny-vision"
PICTURE = encode(noise((90, 60), seed=11), "PNG")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp(MODEL, numbered=False)
    make_tiny_vlm("idefics3", folder)
    return folder


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("media")
    (media_dir / "picture.png").write_bytes(PICTURE)
    policy = MediaPolicy(allowed_media_dir=media_dir, allow_remote_media=True)
    running = tiny_server(folder, settings=ServerSettings(media=policy))
    running.media_dir = media_dir
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts: dict, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def post(server, messages: list[dict], **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def offline_answer(folder, messages: list[dict], max_tokens: int) -> str:
    llm = LLM(str(folder))
    return llm.chat(messages, SamplingParams(max_tokens=max_tokens, temperature=0)).text


def test_openai_client_image_answer_equals_offline_and_cache_hits(client, folder):
    image = {"type": "image", "image": decode_image(PICTURE, ImageLimits())}
    expected = offline_answer(folder, [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}], 12)
    first = client.chat.completions.create(model=MODEL, messages=ask(image_part(data_uri(PICTURE))),
                                           max_tokens=12, temperature=0)
    assert first.choices[0].message.content == expected
    usage = first.usage.model_extra["image_usage"]
    assert usage["images"] == 1 and usage["encoder_cache_hits"] == 0 and usage["encode_time"] > 0
    assert usage["decode_time"] > 0 and usage["preprocess_time"] > 0
    again = client.chat.completions.create(model=MODEL, messages=ask(image_part(data_uri(PICTURE))),
                                           max_tokens=12, temperature=0)
    assert again.choices[0].message.content == expected
    assert again.usage.model_extra["image_usage"]["encoder_cache_hits"] == 1


def test_streamed_answer_with_two_images_and_an_earlier_turn(client, server):
    second = data_uri(encode(noise((40, 70), seed=12), "JPEG"), "image/jpeg")
    messages = [*ask(image_part(data_uri(PICTURE)), image_part(second), text="Compare."),
                {"role": "assistant", "content": "They differ."}, {"role": "user", "content": "How?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.model_extra["image_usage"]["images"] == 2


def test_local_path_inside_the_allowed_folder(server):
    response = post(server, ask(image_part(f"file://{server.media_dir}/picture.png")))
    assert response.status_code == 200, response.text
    assert_error(post(server, ask(image_part("/etc/passwd"))), 400)


HOSTILE = {
    "decompression bomb": (data_uri(png_with_header_only(30000, 30000)), 400),
    "truncated jpeg": (data_uri(encode(noise((64, 64)), "JPEG")[:700], "image/jpeg"), 400),
    "1x1 image": (data_uri(encode(noise((1, 1)), "PNG")), 400),
    "png declared as jpeg": (data_uri(PICTURE, "image/jpeg"), 400),
    "not an image": ("data:image/png;base64," + base64.b64encode(b"hello").decode(), 400),
    "remote loopback": ("http://127.0.0.1:1/x.png", 400),
    "remote metadata": ("http://169.254.169.254/latest/meta-data", 400),
    "unknown scheme": ("ftp://example.com/x.png", 400),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_images_get_their_4xx(server, case):
    url, status = HOSTILE[case]
    error = assert_error(post(server, ask(image_part(url))), status)
    assert "\n" not in error["message"]


def test_six_images_and_a_30_mb_body(server):
    six = [image_part(data_uri(PICTURE)) for _ in range(6)]
    assert_error(post(server, ask(*six)), 400)
    big = data_uri(b"\x89PNG" + bytes(30 * 1024 * 1024))
    assert_error(post(server, ask(image_part(big))), 413)


def test_marker_typed_in_text_and_image_part_without_url(server):
    assert_error(post(server, ask(image_part(data_uri(PICTURE)), text="<image> twice")), 400)
    assert_error(post(server, ask({"type": "image_url"})), 400)


def test_server_keeps_serving_after_hostile_input(server):
    for url, _ in HOSTILE.values():
        post(server, ask(image_part(url)))
    response = post(server, ask(image_part(data_uri(PICTURE))))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert server.state.engine_stats().num_running == 0
