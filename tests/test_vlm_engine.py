"""Vision-language models end to end on tiny random Idefics3 (SmolVLM) and LLaVA folders:
images enter the same engine as text (chunked prefill, batching, aborts), and greedy answers
equal transformers' own model fed transformers' own processor output."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hayate.llm import LLM
from hayate.multimodal.image import ImageLimits, MediaError, decode_image
from hayate.sampling import SamplingParams
from tiny_models import make_tiny_model
from tiny_vlms import hf_processor, make_tiny_vlm

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
KINDS = ["idefics3", "llava"]


@pytest.fixture(scope="module", params=KINDS)
def vlm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf_model = make_tiny_vlm(request.param, folder)
    return folder, hf_model


def picture(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": i, "detail": "high"} for i in images),
                                        {"type": "text", "text": text}]}


def hf_greedy(folder, hf_model, messages: list[dict], images: list, steps: int) -> tuple[list[int], list[int]]:
    """transformers' processor and model, greedy by full recomputation: (prompt ids, answer ids)."""
    processor = hf_processor(folder)
    template_messages = [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
                         if isinstance(m["content"], list) else m for m in messages]
    text = processor.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[i.image for i in images] or None, return_tensors="pt")
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    prompt, answer = ids[0].tolist(), []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(input_ids=ids, **inputs).logits
            token = int(logits[0, -1].argmax())
            answer.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return prompt, answer


def decoded(width: int, height: int, seed: int):
    return decode_image(picture(width, height, seed), ImageLimits())


@pytest.mark.parametrize("chunk", [512, 7])
def test_greedy_answer_with_an_image_equals_transformers(vlm, chunk):
    folder, hf_model = vlm
    image = decoded(100, 37, seed=1)
    messages = [user("What is in this picture?", image)]
    llm = LLM(str(folder), prefill_chunk=chunk)
    prompt = llm.prepare_chat(messages)
    reference_prompt, reference = hf_greedy(folder, hf_model, messages, [image], GREEDY.max_tokens)
    assert prompt.token_ids == reference_prompt
    assert llm.chat(messages, GREEDY).token_ids == reference


def test_two_images_and_an_image_in_an_earlier_turn(vlm):
    folder, hf_model = vlm
    first, second = decoded(64, 64, seed=2), decoded(37, 90, seed=3)
    llm = LLM(str(folder))
    two = [user("Compare them.", first, second)]
    assert llm.chat(two, GREEDY).token_ids == hf_greedy(folder, hf_model, two, [first, second], 32)[1]
    earlier = [user("Describe it.", first), {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
               user("And now?")]
    assert llm.chat(earlier, GREEDY).token_ids == hf_greedy(folder, hf_model, earlier, [first], 32)[1]


def test_repeated_image_skips_the_encoder(vlm):
    folder, _ = vlm
    image = decoded(80, 60, seed=4)
    llm = LLM(str(folder))
    first = llm.chat([user("What is it?", image)], GREEDY)
    again = llm.chat([user("What is it?", decode_image(picture(80, 60, seed=4), ImageLimits()))], GREEDY)
    assert first.timings.images.encoder_cache_hits == 0
    assert again.timings.images.encoder_cache_hits == 1
    assert again.token_ids == first.token_ids
    assert llm.engine.runner.images.cache.hits == 1


def test_image_request_batched_with_text_requests_and_aborted(vlm):
    folder, _ = vlm
    image = decoded(50, 70, seed=5)
    alone_llm = LLM(str(folder))
    image_prompt = alone_llm.prepare_chat([user("Look.", image)])
    text_ids = alone_llm.encode_chat([{"role": "user", "content": "Hello there"}])
    expected_image = alone_llm.chat([user("Look.", image)], GREEDY).token_ids
    expected_text = alone_llm.generate(text_ids, GREEDY).token_ids

    llm = LLM(str(folder), max_num_seqs=4, prefill_chunk=9)
    engine = llm.engine
    engine.add_request("image", image_prompt.token_ids, GREEDY, image_prompt.images)
    engine.add_request("text", text_ids, GREEDY)
    engine.add_request("gone", image_prompt.token_ids, GREEDY, image_prompt.images)
    tokens: dict[str, list[int]] = {"image": [], "text": []}
    engine.step()
    engine.abort_request("gone")
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
    assert tokens == {"image": expected_image, "text": expected_text}
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_text_only_model_refuses_images(tmp_path):
    make_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path))
    with pytest.raises(MediaError, match="does not accept images"):
        llm.chat([user("What is it?", decoded(10, 10, seed=6))], GREEDY)


def test_marker_typed_by_the_user_is_refused(vlm):
    folder, _ = vlm
    llm = LLM(str(folder))
    with pytest.raises(MediaError, match="do not match"):
        llm.prepare_chat([user("<image> what?", decoded(20, 20, seed=7))])
