"""OpenAI's `detail` on image parts, on tiny random SmolVLM- and LLaVA-shaped folders: "low" is
transformers' own processor with splitting off (same pixels, same prompt), "high" its full
tiling, "auto" one view for a picture that fits in one; the encoder cache keeps the views
apart; usage counts image tokens; HTTP takes detail in both of OpenAI's part shapes."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from hayate.llm import LLM
from hayate.multimodal.image import ImageLimits, MediaError, decode_image
from hayate.multimodal.media import MediaPolicy
from hayate.multimodal.processor import load_processor
from hayate.sampling import SamplingParams
from hayate.server import ServerSettings
from image_samples import data_uri, encode, noise
from server_harness import tiny_server
from test_server_errors import assert_error
from tiny_vlms import hf_processor, make_tiny_vlm, save_tiny_processor

MODEL = "tiny-detail"
WIDE = encode(noise((90, 60), seed=21), "PNG")    # wider than the 64-pixel tile: auto is high
SMALL = encode(noise((50, 40), seed=22), "PNG")   # fits one tile: auto is low
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
TILE_TOKENS = 16    # tiny_vlms' Idefics3: 64-pixel tiles, 8-pixel patches, pixel shuffle by 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp(MODEL, numbered=False)
    make_tiny_vlm("idefics3", folder)
    return folder


def features(folder, image: bytes, detail: str):
    processor = load_processor(folder, _config(folder))
    decoded = decode_image(image, ImageLimits())
    return processor.process(decoded.image, decoded.content_hash, detail)


def _config(folder) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


def test_low_is_transformers_processor_with_splitting_off(folder, tmp_path):
    save_tiny_processor("idefics3", tmp_path, do_image_splitting=False)
    reference = hf_processor(tmp_path).image_processor(decode_image(WIDE, ImageLimits()).image, return_tensors="np")
    low = features(folder, WIDE, "low")
    assert low.detail == "low" and low.num_image_tokens == TILE_TOKENS
    np.testing.assert_array_equal(low.pixel_values.numpy(), reference["pixel_values"][0])
    high = features(folder, WIDE, "high")
    assert high.detail == "high" and high.num_image_tokens == 5 * TILE_TOKENS   # 2 x 2 tiles + the global view
    assert high.cache_key != low.cache_key and high.content_hash == low.content_hash


def test_auto_chooses_by_size(folder):
    assert features(folder, WIDE, "auto").detail == "high"
    assert features(folder, SMALL, "auto").detail == "low"
    assert features(folder, SMALL, "high").num_image_tokens > features(folder, SMALL, "auto").num_image_tokens


def test_llava_sees_one_view_at_every_detail(tmp_path):
    make_tiny_vlm("llava", tmp_path)
    views = [features(tmp_path, WIDE, detail) for detail in ("low", "high", "auto")]
    assert len({view.num_image_tokens for view in views}) == 1
    assert all(np.array_equal(view.pixel_values, views[0].pixel_values) for view in views)


def ask(image: bytes, detail: str | None) -> list[dict]:
    part = {"type": "image", "image": decode_image(image, ImageLimits())}
    if detail is not None:
        part["detail"] = detail
    return [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]


def test_engine_counts_image_tokens_and_caches_each_view_apart(folder):
    llm = LLM(str(folder))
    low = llm.chat(ask(WIDE, "low"), GREEDY)
    high = llm.chat(ask(WIDE, "high"), GREEDY)
    again = llm.chat(ask(WIDE, "low"), GREEDY)
    assert low.timings.images.num_image_tokens == TILE_TOKENS
    assert high.timings.images.num_image_tokens == 5 * TILE_TOKENS
    assert high.num_prompt_tokens - low.num_prompt_tokens > 4 * TILE_TOKENS   # four more tiles and their framing
    assert high.timings.images.encoder_cache_hits == 0   # the same bytes, other pixels
    assert again.timings.images.encoder_cache_hits == 1 and again.token_ids == low.token_ids
    assert llm.chat(ask(WIDE, None), GREEDY).token_ids == high.token_ids   # no detail: auto, here high
    with pytest.raises(MediaError, match="detail must be one of low, high, auto; got 'medium'"):
        llm.chat(ask(WIDE, "medium"), GREEDY)


@pytest.fixture(scope="module")
def server(folder):
    running = tiny_server(folder, settings=ServerSettings(media=MediaPolicy(default_detail="low")))
    yield running
    running.stop()


def post(server, part: dict) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("part, tokens", [
    ({"type": "image_url", "image_url": {"url": data_uri(WIDE), "detail": "high"}}, 5 * TILE_TOKENS),
    ({"type": "image_url", "image_url": {"url": data_uri(WIDE), "detail": "low"}}, TILE_TOKENS),
    ({"type": "input_image", "image_url": data_uri(WIDE), "detail": "high"}, 5 * TILE_TOKENS),   # Responses' shape
    ({"type": "image_url", "image_url": {"url": data_uri(WIDE)}}, TILE_TOKENS),   # the server's --image-detail low
])
def test_server_detail_in_both_part_shapes(server, part, tokens):
    response = post(server, part)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"]["image_tokens"] == tokens
    assert usage["image_usage"]["image_tokens"] == tokens


@pytest.mark.parametrize("part, param", [
    ({"type": "image_url", "image_url": {"url": data_uri(WIDE), "detail": "ultra"}},
     "messages[0].content[0].image_url.detail"),
    ({"type": "input_image", "image_url": data_uri(WIDE), "detail": 3}, "messages[0].content[0].detail"),
])
def test_server_refuses_an_unknown_detail(server, part, param):
    response = post(server, part)
    assert_error(response, 400, param=param)
    assert "low, high, auto" in response.json()["error"]["message"]
    assert post(server, {"type": "image_url", "image_url": {"url": data_uri(SMALL)}}).status_code == 200


def count_encoder_calls(llm: LLM, monkeypatch) -> list[int]:
    """The tiles of each call the engine makes to the model's encoder, as they happen."""
    model, calls = llm.engine.runner.model, []
    encode = model.encode_image

    def counted(pixels, mask=None):
        calls.append(len(pixels))
        return encode(pixels, mask)

    monkeypatch.setattr(model, "encode_image", counted)
    return calls


def test_images_of_a_step_share_one_encoder_batch(folder, monkeypatch):
    """Two requests' images (a low view and a five-tile high view of another picture, and the
    high one again in a third request) go through the encoder as one call of six tiles in the
    step that schedules them; each request's answer equals its answer alone."""
    alone = LLM(str(folder))
    prompts = [alone.prepare_chat(ask(SMALL, "low")), alone.prepare_chat(ask(WIDE, "high")),
               alone.prepare_chat(ask(WIDE, "high"))]
    expected = [alone.chat(ask(SMALL, "low"), GREEDY).token_ids, alone.chat(ask(WIDE, "high"), GREEDY).token_ids]
    llm = LLM(str(folder), max_num_seqs=4)
    batches = count_encoder_calls(llm, monkeypatch)
    for name, prompt in zip(("small", "wide", "wide again"), prompts):
        llm.engine.add_request(name, prompt.token_ids, GREEDY, prompt.images)
    tokens: dict[str, list[int]] = {"small": [], "wide": [], "wide again": []}
    while llm.engine.has_unfinished():
        for output in llm.engine.step():
            tokens[output.request_id] += output.token_ids
    assert batches == [1 + 5]   # one call; the repeated picture encoded once
    assert tokens == {"small": expected[0], "wide": expected[1], "wide again": expected[1]}


def test_an_images_tiles_go_through_the_encoder_a_few_at_a_time(folder, monkeypatch):
    """Past MAX_PIXELS_PER_CALL the tiles run in calls of fewer tiles (a layer's activations kept
    in cache); the rows are those of one call."""
    import hayate.engine.images as images

    llm = LLM(str(folder))
    whole = llm.chat(ask(WIDE, "high"), GREEDY)
    calls = count_encoder_calls(llm, monkeypatch)
    monkeypatch.setattr(images, "MAX_PIXELS_PER_CALL", 2 * 64 * 64)
    llm.engine.runner.images.cache = type(llm.engine.runner.images.cache)(1 << 20)   # forget the first answer's
    chunked = llm.chat(ask(WIDE, "high"), GREEDY)
    assert calls == [2, 2, 1] and chunked.token_ids == whole.token_ids
