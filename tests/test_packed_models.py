"""Whole models on the packed path (native kernels; q/k/v and gate/up side by side, fused
where the VNNI kernel does not take them apart; the embedding looked up in its blocks; the
tied head reading them too) against the same GGUF file dequantized to fp32."""
from __future__ import annotations

import pytest

from hayate.kernels import native_kernels
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from gguf_files import QType, export_hf_model, projections_per_layer, tiny_model

PROMPT = [3, 17, 5, 60, 21, 8, 44, 9]


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
@pytest.mark.parametrize("arch, qtype", [("llama", QType.Q4_1), ("qwen2", QType.Q4_0), ("llama", QType.Q8_0)])
def test_packed_model_matches_fp32_model(tmp_path, arch, qtype):
    path = export_hf_model(tmp_path / f"{arch}.gguf", tiny_model(arch), arch, qtype)
    packed, reference = LLM(str(path), weights="auto"), LLM(str(path), weights="fp32")
    modules = [type(m).__name__ for m in packed.engine.runner.model.modules()]
    # q, k, v, o, gate, up and down in every layer (or qkv, o, gate_up, down), and the head
    assert modules.count("PackedLinear") == projections_per_layer() * packed.model_config.num_hidden_layers + 1
    assert modules.count("PackedEmbedding") == 1
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    ours, theirs = packed.generate(PROMPT, params), reference.generate(PROMPT, params)
    assert ours.token_ids == theirs.token_ids
    for a, b in zip(ours.logprobs, theirs.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-3
