"""Each Llama-family architecture against Hugging Face transformers, on tiny random models."""
from __future__ import annotations

import pytest
import torch

from hayate.engine.kv_cache import KVCache
from hayate.layers.attention import AttentionMetadata
from hayate.llm import LLM
from hayate.loading.safetensors import SafetensorsFolder
from hayate.models.config import ModelConfig
from hayate.models.registry import build_model
from hayate.sampling import SamplingParams
from tiny_models import ARCHITECTURES, make_tiny_model

# Three chat turns' worth of token ids, fed as three successive prefills over one KV cache.
TURNS = [[256, 257, 10, 20, 30, 40, 259], [257, 99, 98, 97, 96, 95, 94, 93, 259], [257, 5, 6, 7, 8]]


def load_hayate(folder):
    source = SafetensorsFolder(folder)
    config = ModelConfig.from_hf(source.config)
    model = build_model(config, max_positions=256)
    model.load_weights(source.tensors())
    return model.eval(), config


def hayate_logits_by_turns(model, config) -> torch.Tensor:
    cache = KVCache(config, num_blocks=8, block_size=4)
    cache.bind(model)
    logits, start = [], 0
    block_table = [5, 2, 7, 0, 3, 1]  # scattered blocks: the paging must not matter
    with torch.inference_mode():
        for turn in TURNS:
            meta = AttentionMetadata.build([block_table], [start], [len(turn)], block_size=4)
            hidden = model(torch.tensor(turn), meta.positions(), meta)
            logits.append(model.compute_logits(hidden))
            start += len(turn)
    return torch.cat(logits)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_logits_match_transformers(kind, tmp_path):
    reference = make_tiny_model(kind, tmp_path)
    model, config = load_hayate(tmp_path)
    ids = torch.tensor([sum(TURNS, [])])
    with torch.inference_mode():
        expected = reference(ids).logits[0]
    actual = hayate_logits_by_turns(model, config)
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_greedy_tokens_match_transformers(kind, tmp_path):
    reference = make_tiny_model(kind, tmp_path)
    prompt = sum(TURNS, [])
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                                      min_new_tokens=32, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    llm = LLM(str(tmp_path), prefill_chunk=5)  # chunks smaller than the prompt: chunked prefill
    result = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert result.token_ids == expected.tolist()


def test_tied_embeddings_share_storage(tmp_path):
    make_tiny_model("tied", tmp_path)
    model, _ = load_hayate(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
