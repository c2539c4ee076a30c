"""The real default model (SmolLM2-135M-Instruct Q4_1) against transformers loading the
same GGUF file: an independent implementation on real prompts."""
from __future__ import annotations

import pytest
import torch

from hayate.bench.prompts import PARITY_PROMPTS
from hayate.llm import LLM
from hayate.loading.loader import default_model_path
from hayate.sampling import SamplingParams
from gguf_files import projections_per_layer

PROMPTS = PARITY_PROMPTS
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llm():
    return LLM(threads=2)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def reference_greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[list[int]]]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=2)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    top5 = [step[0].topk(5).indices.tolist() for step in out.logits]
    return tokens, top5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_answer_agrees_with_transformers(llm, reference, prompt):
    model, tokenizer = reference
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = llm.encode_chat(messages)
    assert prompt_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    expected, expected_top5 = reference_greedy(model, prompt_ids)
    result = llm.generate(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=5))
    actual = result.token_ids
    for step, (ours, theirs) in enumerate(zip(actual, expected)):
        if ours != theirs:
            ours_top5 = [token for token, _ in result.logprobs[step].top]
            assert ours in expected_top5[step] and theirs in ours_top5, (step, actual, expected)
            break
    else:
        assert len(actual) == len(expected) or result.finish_reason == "stop"


def test_capital_of_france_is_paris(llm):
    result = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(max_tokens=16, temperature=0))
    assert "Paris" in result.text


def test_streamed_text_equals_whole_text(llm):
    params = SamplingParams(max_tokens=20, temperature=0)
    messages = [{"role": "user", "content": "Say hello in three languages."}]
    streamed = "".join(output.text for output in llm.stream_chat(messages, params))
    assert streamed == llm.chat(messages, params).text


def test_closing_a_stream_frees_its_slot(llm):
    stream = llm.stream_chat([{"role": "user", "content": "Count to fifty."}], SamplingParams(max_tokens=50))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


@pytest.fixture(scope="module")
def fp32_llm():
    return LLM(threads=2, weights="fp32")


def test_default_path_reads_packed_blocks(llm):
    """By default the GGUF blocks stay packed and run through the native kernels."""
    layers = [type(m).__name__ for m in llm.engine.runner.model.modules()]
    assert layers.count("PackedLinear") == 30 * projections_per_layer() + 1   # and the tied head
    assert layers.count("PackedEmbedding") == 1   # rows decoded as tokens are looked up


@pytest.mark.parametrize("prompt", PROMPTS)
def test_packed_path_gives_the_fp32_answers(llm, fp32_llm, prompt):
    """Slow twin: the packed kernels against weights dequantized to fp32 at load."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    messages = [{"role": "user", "content": prompt}]
    assert llm.chat(messages, params).token_ids == fp32_llm.chat(messages, params).token_ids
