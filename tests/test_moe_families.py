"""The other mixtures of experts, and Qwen3, against Hugging Face transformers on tiny random
models: Qwen2-MoE (a shared expert beside the routed ones, weights not renormalised, a dense
layer among sparse ones), Qwen3-MoE (queries and keys normalised per head, renormalised or
not), OLMoE (whole-projection q/k norms, clip_qkv) and the dense Qwen3. Each family's MoE block
bit for bit, logits over a paged cache in chunks, and greedy tokens alone and in a batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from hayate.engine.decode_plan import _plannable
from hayate.layers.moe import SparseMoE
from hayate.llm import LLM
from hayate.models.config import ModelConfig
from hayate.models.llama import LlamaMLP
from test_llama_parity import load_hayate
from test_mixtral import GREEDY, PROMPT, greedy, logits_in_chunks
from tiny_models import BYTE_VOCAB, VOCAB_SIZE, save_tiny_folder

COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.1, bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB + 3, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, experts_implementation="eager")
# family -> (transformers config and model classes, settings beyond COMMON)
FAMILIES = {
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(MOE, moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(MOE, moe_intermediate_size=32, norm_topk_prob=True, head_dim=24)),
    "qwen3_moe-unnormalised": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                               dict(MOE, moe_intermediate_size=32, norm_topk_prob=False, decoder_sparse_step=2)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, dict(MOE, clip_qkv=0.3)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    """(name, transformers model, its saved folder) for each family."""
    config_class, model_class, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    reference = model_class(config_class(**COMMON, **extra)).eval()
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_folder(reference, folder)
    return request.param, reference, folder


def test_config_reads_each_family(family):
    name, reference, folder = family
    config = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(folder).to_dict())
    expected = {"qwen2_moe": (4, 2, 32, 48, False, (1,), "", None, True),
                "qwen3_moe": (4, 2, 32, 0, True, (), "head", None, False),
                "qwen3_moe-unnormalised": (4, 2, 32, 0, False, (0, 2), "head", None, False),
                "olmoe": (4, 2, 96, 0, False, (), "full", 0.3, False),
                "qwen3": (0, 0, 0, 0, True, (), "head", None, False)}[name]
    assert (config.num_local_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.shared_expert_intermediate_size, config.norm_topk_prob, config.dense_layers,
            config.qk_norm, config.clip_qkv, config.attention_bias) == expected


def test_moe_blocks_equal_transformers_bit_for_bit(family):
    name, reference, folder = family
    model, config = load_hayate(folder)
    torch.manual_seed(1)
    for index, (layer, theirs) in enumerate(zip(model.model.layers, reference.model.layers)):
        expect_sparse = config.num_local_experts > 0 and index not in config.dense_layers
        assert isinstance(layer.mlp, SparseMoE if expect_sparse else LlamaMLP)
        for tokens in (1, 3, 37):
            x = torch.randn(tokens, 64)
            with torch.inference_mode():
                ours, expected = layer.mlp(x), theirs.mlp(x[None])[0]
            if expect_sparse:
                assert torch.equal(ours, expected), (index, tokens)
            else:   # a dense layer's gate and up are stacked into one GEMM, which may round otherwise
                assert torch.allclose(ours, expected, rtol=0, atol=1e-6), (index, tokens)


@pytest.mark.parametrize("chunk", [len(PROMPT), 5])
def test_logits_match_transformers(family, chunk):
    name, reference, folder = family
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    llm = LLM(str(folder), prefill_chunk=chunk)
    assert not _plannable(llm.engine.runner.model)
    actual = logits_in_chunks(llm.engine.runner.model, llm.model_config, PROMPT, chunk)
    assert (actual - expected).abs().max().item() < 1e-4


def test_greedy_alone_and_batched_match_transformers(family):
    name, reference, folder = family
    prompts = [PROMPT, PROMPT[3:12], [7, 3]]
    expected = [greedy(reference, prompt, 16) for prompt in prompts]
    llm = LLM(str(folder), prefill_chunk=5, max_num_seqs=3)
    assert llm.generate(PROMPT, GREEDY).token_ids == expected[0]
    assert [result.token_ids for result in llm.generate(prompts, GREEDY)] == expected


def test_clip_qkv_clamps(family):
    """OLMoE's clip is live in the tiny model: without it the logits differ."""
    name, reference, folder = family
    if name != "olmoe":
        pytest.skip("clip_qkv is OLMoE's")
    model, config = load_hayate(folder)
    for layer in model.model.layers:
        layer.self_attn.clip = None
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    unclipped = logits_in_chunks(model, config, PROMPT, len(PROMPT))
    assert (unclipped - expected).abs().max().item() > 1e-3
