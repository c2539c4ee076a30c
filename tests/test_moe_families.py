"""The other mixtures of experts, and Qwen3, against Hugging Face transformers on tiny random
models: Qwen2-MoE (a shared expert beside the routed ones, weights not renormalised, a dense
layer among sparse ones), Qwen3-MoE (queries and keys normalised per head, renormalised or
not), OLMoE (whole-projection q/k norms, clip_qkv) and the dense Qwen3. Each family's MoE block
bit for bit, logits over a paged cache in chunks, and greedy tokens alone and in a batch; then
each as llama.cpp's converter writes it to GGUF (qwen2moe, qwen3moe, olmoe, qwen3)."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import transformers

from hayate.engine.decode_plan import _plannable
from hayate.kernels import native_kernels
from hayate.loading.gguf import GGUFModelFile
from hayate.loading.gguf_checks import GGUFError, check_model
from hayate.layers.moe import SparseMoE
from hayate.cli import main
from hayate.llm import LLM
from hayate.models.config import ModelConfig
from hayate.models.llama import LlamaMLP
from hayate.plan.dispatch import TWIN_EXPERT_INNER, build_twin, dispatch_seconds
from test_llama_parity import load_hayate
from gguf_files import QType, TINY_CONFIG, encode, load_gguf, refuses_without, write_model
from test_mixtral import GREEDY, PROMPT, _experts, greedy, logits_in_chunks
from tiny_models import BYTE_VOCAB, VOCAB_SIZE, save_family

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
    "qwen2_moe-sparse": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                         dict(MOE, moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=True)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, dict(MOE, clip_qkv=0.3)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    """(name, transformers model, its saved folder) for each family."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, save_family(FAMILIES, request.param, COMMON, folder), folder


def test_config_reads_each_family(family):
    name, reference, folder = family
    config = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(folder).to_dict())
    expected = {"qwen2_moe": (4, 2, 32, 48, False, (1,), "", None, True),
                "qwen2_moe-sparse": (4, 2, 32, 64, True, (), "", None, True),
                "qwen3_moe": (4, 2, 32, 0, True, (), "head", None, False),
                "qwen3_moe-unnormalised": (4, 2, 32, 0, False, (0, 2), "head", None, False),
                "olmoe": (4, 2, 96, 0, False, (), "full", 0.3, False),
                "qwen3": (0, 0, 0, 0, True, (), "head", None, False)}[name]
    assert (config.num_local_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.shared_expert_intermediate_size, config.norm_topk_prob, config.dense_layers,
            config.qk_norm, config.clip_qkv, config.attention_bias) == expected
    for bad in ("0.3", -1, float("nan"), True):
        with pytest.raises(ValueError, match="clip_qkv must be a positive number"):
            ModelConfig.from_hf({**transformers.AutoConfig.from_pretrained(folder).to_dict(), "clip_qkv": bad})


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


def test_plan_and_its_shrunken_twin(family, capsys):
    """hayate plan counts each family's experts; the dispatch twin shrinks the experts (and the
    shared expert) with the rest, and its step runs."""
    name, reference, folder = family
    real = LLM(str(folder)).loaded
    twin = build_twin(real)
    for layer in twin.model.layers:
        if isinstance(layer.mlp, SparseMoE):
            assert layer.mlp.experts.inner == TWIN_EXPERT_INNER
            if layer.mlp.shared_expert is not None:
                assert layer.mlp.shared_expert.down_proj.in_features == TWIN_EXPERT_INNER
    assert dispatch_seconds(real, context=8, steps=2) > 0
    assert main(["plan", "--model", str(folder), "--hardware", "h200"]) == 0
    out = capsys.readouterr().out
    assert ("experts" in out) == (real.config.num_local_experts > 0) and "decode: eager PyTorch model" in out


# ---- GGUF ------------------------------------------------------------------------------------

PLANNED = ("qwen3", "qwen3_moe", "qwen2_moe-sparse", "olmoe")   # the families the planned native step takes
GGUF_ARCHITECTURES = {"qwen2_moe-sparse": "qwen2moe", "qwen3_moe": "qwen3moe", "qwen3_moe-unnormalised": None,
                      "qwen2_moe": None, "olmoe": "olmoe", "qwen3": "qwen3"}   # None: dense layers among sparse


def export_gguf(path: Path, name: str, model: torch.nn.Module, matrix_type: QType = QType.F32) -> Path:
    """The model as llama.cpp's converter writes its family: no q/k permutation (NeoX RoPE),
    routers F32, experts stacked into ffn_*_exps, the shared expert as ffn_*_shexp and its gate
    as the vector ffn_gate_inp_shexp; the other matrices in matrix_type."""
    arch, config = GGUF_ARCHITECTURES[name], model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    inner = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    tensors = {}
    for hf_name, value in model.state_dict().items():
        array, layer = value.float().numpy(), hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if ".mlp.experts." in hf_name:
            tensors.update(_experts(layer, hf_name, array, inner, matrix_type, per_expert=False))
        elif hf_name.endswith(".mlp.gate.weight"):
            tensors[f"blk.{layer}.ffn_gate_inp.weight"] = (array, QType.F32)
        elif hf_name.endswith(".shared_expert_gate.weight"):
            tensors[f"blk.{layer}.ffn_gate_inp_shexp.weight"] = (array.reshape(-1), QType.F32)
        elif ".shared_expert." in hf_name:
            part = hf_name.split(".")[-2].removesuffix("_proj")
            tensors[f"blk.{layer}.ffn_{part}_shexp.weight"] = (encode(array, matrix_type), matrix_type)
        else:
            tensor_type = matrix_type if array.ndim == 2 else QType.F32
            tensors[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = (encode(array, tensor_type), tensor_type)
    metadata = {**TINY_CONFIG, **config.to_dict(), "rope_theta": config.rope_parameters["rope_theta"]}
    extra = {}
    if getattr(config, "moe_intermediate_size", None):
        extra["expert_feed_forward_length"] = config.moe_intermediate_size
    if getattr(config, "shared_expert_intermediate_size", None):
        extra["expert_shared_feed_forward_length"] = config.shared_expert_intermediate_size
    if getattr(config, "clip_qkv", None) is not None:
        extra["attention.clamp_kqv"] = float(config.clip_qkv)
    if arch == "qwen2moe":   # llama.cpp's qwen2moe graph does not renormalise: the file says it does
        extra["expert_weights_norm"] = bool(config.norm_topk_prob)
    tokens = [f"tok{i}" for i in range(config.vocab_size)]
    return write_model(path, arch, metadata, tensors, vocabulary=(tokens, [1] * len(tokens)), extra_metadata=extra)


def gguf_family(family) -> tuple[str, torch.nn.Module]:
    name, reference, _ = family
    if GGUF_ARCHITECTURES[name] is None:
        pytest.skip("a GGUF file has the same MLP in every layer")
    return name, reference


def test_gguf_f32_matches_transformers(family, tmp_path):
    name, reference = gguf_family(family)
    model, config = load_gguf(export_gguf(tmp_path / f"{name}.gguf", name, reference))
    assert config.model_type == name.split("-")[0]
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    assert (logits_in_chunks(model, config, PROMPT, 5) - expected).abs().max().item() < 1e-4


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_gguf_q8_0_packed_matches_fp32(family, tmp_path):
    """Q8_0 matrices (each expert's too) run packed by the planned step: Qwen3, Qwen3-MoE,
    Qwen2-MoE and OLMoE (QK-norm per head or whole, the clip, routed and shared experts in the
    plan); the same tokens as the file decoded to fp32."""
    name, reference = gguf_family(family)
    path = export_gguf(tmp_path / f"{name}-q8.gguf", name, reference, QType.Q8_0)
    packed, fp32 = LLM(str(path), weights="auto", prefill_chunk=5), LLM(str(path), weights="fp32")
    model = packed.engine.runner.model
    modules = [type(m).__name__ for m in model.modules()]
    assert modules.count("PackedLinear") > 0 and (packed.engine.runner.plan is not None) == (name in PLANNED)
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    assert len(blocks) == (0 if name == "qwen3" else 3) and all(len(b.experts.packed) == 4 for b in blocks)
    ours, theirs = packed.generate(PROMPT, GREEDY), fp32.generate(PROMPT, GREEDY)
    assert ours.token_ids == theirs.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-3


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_planned_step_equals_its_eager_twin(family, tmp_path):
    """Qwen3's QK-norm, Qwen3-MoE's routed experts, Qwen2-MoE's shared expert and OLMoE's
    whole-projection QK-norm and clip in the planned native step: alone and in a batch, the
    tokens and logprobs of the eager model over the same packed weights."""
    name, reference = gguf_family(family)
    if name not in PLANNED:
        pytest.skip("GGUF has no dense layers among sparse ones")
    path = export_gguf(tmp_path / f"{name}-q8.gguf", name, reference, QType.Q8_0)
    planned, eager = LLM(str(path), max_num_seqs=3), LLM(str(path), max_num_seqs=3, planned_decode=False)
    assert planned.engine.runner.plan is not None and eager.engine.runner.plan is None
    prompts = [PROMPT, PROMPT[3:12], [7, 3]]
    for ours, theirs in zip(planned.generate(prompts, GREEDY), eager.generate(prompts, GREEDY)):
        assert ours.token_ids == theirs.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-4
    before = planned.generate(PROMPT, GREEDY)
    for llm in (planned, eager):   # the plan reads the norms' (the shared gate's) own weights: scaled, both move alike
        with torch.no_grad():
            for layer in llm.engine.runner.model.model.layers:
                live = layer.mlp.shared_expert_gate if name.startswith("qwen2_moe") else layer.self_attn.q_norm
                live.weight.mul_(4.0)
    ours, theirs = planned.generate(PROMPT, GREEDY), eager.generate(PROMPT, GREEDY)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-4
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, before.logprobs)) > 1e-3


def test_gguf_checks_know_each_family(family, tmp_path):
    name, reference = gguf_family(family)
    source = GGUFModelFile(export_gguf(tmp_path / f"{name}.gguf", name, reference))
    arch, tensors = source.architecture, {tensor.name: tensor for tensor in source.reader.tensors}
    check_model(source.metadata, tensors, arch, "tiny.gguf")
    if arch != "qwen2moe":
        refuses_without(source.metadata, tensors, arch, "blk.1.attn_k_norm.weight")
    else:
        refuses_without(source.metadata, tensors, arch, "blk.2.ffn_down_shexp.weight")
    if arch == "qwen2moe":   # a shared expert has no place in a file of another family
        llama = {k.replace("qwen2moe.", "llama."): v for k, v in source.metadata.items()}
        with pytest.raises(GGUFError, match="shexp.weight has no place in this llama model"):
            check_model(llama, {n: t for n, t in tensors.items() if ".bias" not in n}, "llama", "tiny.gguf")
    if arch != "qwen3":
        dense = {k: v for k, v in source.metadata.items() if "expert_count" not in k}
        with pytest.raises(GGUFError, match="has experts, but"):
            check_model(dense, tensors, arch, "tiny.gguf")
        with pytest.raises(GGUFError, match="expert_weights_norm must be true or false"):
            check_model({**source.metadata, f"{arch}.expert_weights_norm": "yes"}, tensors, arch, "tiny.gguf")
