"""Tiny GGUF models in Q4_K, Q5_K, Q6_K, Q5_0, Q5_1 and a Q4_K_M-like mix run natively: the
loader keeps them packed, the planned step takes them (q, k and v of different types side by
side), and its greedy tokens and logprobs are the eager model's and the fp32 reference's."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from hayate.kernels import native_kernels
from hayate.layers.embedding import PackedEmbedding
from hayate.layers.linear import PackedLinear
from hayate.layers.quant import dequantize
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from kquant_blocks import DECODED_TYPES, K_CONFIG, NEW_TYPES, export_mixed_model, q4_k_m_type
from gguf_files import QType, tiny_model

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=5)
PROMPTS = [[3, 17, 5, 60, 21, 8, 44, 9], list(range(10, 47))]


def assert_same(ours, theirs, tolerance: float = 1e-3) -> None:
    assert ours.token_ids == theirs.token_ids
    for a, b in zip(ours.logprobs, theirs.logprobs):
        assert abs(a.logprob - b.logprob) < tolerance
        assert [i for i, _ in a.top] == [i for i, _ in b.top]


def export(tmp_path, arch: str, type_of, **overrides) -> str:
    model = tiny_model(arch, **K_CONFIG, **overrides)
    return str(export_mixed_model(tmp_path / f"{arch}.gguf", model, arch, type_of))


def packed_types(llm: LLM) -> set[QType]:
    return {QType(m.ggml_type) for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)}


def check_against_eager_and_fp32(path: str) -> LLM:
    planned, eager, fp32 = LLM(path), LLM(path, planned_decode=False), LLM(path, weights="fp32")
    assert planned.engine.runner.plan is not None
    for prompt in PROMPTS:
        ours = planned.generate(prompt, PARAMS)
        assert_same(ours, eager.generate(prompt, PARAMS))
        assert_same(ours, fp32.generate(prompt, PARAMS))
    return planned


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_one_type_models_run_planned(tmp_path, qtype):
    """The embedding table too stays in qtype's blocks, a row decoded per token, in the plan
    and in the eager model, with the fp32 reference's answers."""
    planned = check_against_eager_and_fp32(export(tmp_path, "llama", lambda name: qtype))
    assert packed_types(planned) == {qtype}
    embedding = planned.engine.runner.model.model.embed_tokens
    assert isinstance(embedding, PackedEmbedding) and embedding.ggml_type == qtype


def test_a_packed_embedding_decodes_rows_as_the_whole_table(tmp_path):
    path = export(tmp_path, "llama", lambda name: QType.Q6_K)
    embedding = LLM(path).engine.runner.model.model.embed_tokens
    table = dequantize(embedding.packed, embedding.ggml_type, (embedding.num_embeddings, embedding.embedding_dim))
    ids = torch.tensor([[5, 0, 5], [embedding.num_embeddings - 1, 7, 1]])
    assert torch.equal(embedding(ids), table[ids])
    with pytest.raises(IndexError):
        embedding(torch.tensor([embedding.num_embeddings]))


def test_a_q4_k_m_mix_runs_planned_with_unfused_projections(tmp_path):
    """Q4_K with Q6_K for attn_v / ffn_down / output, and Q5_0, Q5_1, Q5_K, Q8_0 in the second
    layer; Qwen2's q, k and v biases go with their unfused projections."""
    planned = check_against_eager_and_fp32(export(tmp_path, "qwen2", q4_k_m_type))
    assert packed_types(planned) == {QType.Q4_K, QType.Q6_K, QType.Q5_0, QType.Q5_1, QType.Q5_K, QType.Q8_0}
    layers = planned.engine.runner.model.model.layers
    assert all(layer.self_attn.qkv_proj is None for layer in layers)   # q, k, v of different types


def test_a_tied_k_quant_head_runs_planned(tmp_path):
    """A tied vocabulary head reads the embedding's Q4_K blocks."""
    planned = check_against_eager_and_fp32(export(tmp_path, "llama", q4_k_m_type, tie_word_embeddings=True))
    assert QType(planned.engine.runner.model.lm_head.ggml_type) == QType.Q4_K


def test_q2_k_and_q3_k_load_through_gguf_s_decoder(tmp_path):
    """No native kernel for Q2_K / Q3_K: they load as fp32 linears holding exactly gguf's
    dequantization of the file's blocks, next to natively kept Q4_K, and the model runs."""
    def type_of(name: str) -> QType:
        return DECODED_TYPES[int(name[4])] if name.startswith("blk.") else QType.Q4_K

    path = export(tmp_path, "llama", type_of)
    llm = LLM(path)
    layers = llm.engine.runner.model.model.layers
    checked = 0
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name.endswith(("attn_output.weight", "ffn_down.weight")):
            assert tensor.tensor_type == DECODED_TYPES[int(tensor.name[4])]
            layer = layers[int(tensor.name[4])]
            weight = layer.self_attn.o_proj.weight if "attn" in tensor.name else layer.mlp.down_proj.weight
            expected = np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
            assert torch.equal(weight.detach().float(), torch.from_numpy(expected))
            checked += 1
    assert checked == 4
    assert packed_types(llm) == {QType.Q4_K}    # the head
    result = llm.generate(PROMPTS[0], PARAMS)
    assert_same(result, LLM(path, weights="fp32").generate(PROMPTS[0], PARAMS))
