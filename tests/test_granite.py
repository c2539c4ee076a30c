"""Granite and Granite-MoE (Llama and Mixtral with four multipliers: embeddings, each layer's
outputs before the residual, the query scale, the logits) against transformers on tiny random
models: logits and greedy tokens from their folders (Granite-MoE's `input_linear` /
`output_linear` / `router.layer` names), and GGUF files written as llama.cpp's converter
writes them (q/k permuted, the multipliers as `granite*.embedding_scale` etc., Granite-MoE's
experts split into ffn_gate/up/down_exps), F32 and Q8_0."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from hayate.llm import LLM
from hayate.loading.gguf_checks import GGUFError
from hayate.sampling import SamplingParams
from gguf_files import QType, TINY_CONFIG, encode, llama_cpp_permute, write_model
from test_llama_parity import TURNS
from tiny_models import BYTE_VOCAB, VOCAB_SIZE, save_family

PROMPT = sum(TURNS, [])
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, embedding_multiplier=12.0,
              attention_multiplier=0.05, residual_multiplier=0.22, logits_scaling=6.0, bos_token_id=BYTE_VOCAB,
              eos_token_id=BYTE_VOCAB + 3, pad_token_id=0)
FAMILIES = {"granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, {}),
            "granitemoe": (transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM,
                           dict(num_local_experts=4, num_experts_per_tok=2))}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, save_family(FAMILIES, request.param, COMMON, folder), folder


def reference_greedy(reference: torch.nn.Module) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                 eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def prompt_logits(llm: LLM) -> torch.Tensor:
    """The prompt's logits, fed as three turns (the model's cache is rebound: generate first)."""
    from test_llama_parity import hayate_logits_by_turns

    return hayate_logits_by_turns(llm.engine.runner.model, llm.model_config)


def test_folder_logits_and_greedy_match_transformers(family):
    name, reference, folder = family
    llm = LLM(str(folder), max_model_len=128)
    config = llm.model_config
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling, config.query_scale) == \
        (12.0, 0.22, 6.0, 0.05)
    assert llm.generate(PROMPT, GREEDY).token_ids == reference_greedy(reference)
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(prompt_logits(llm), expected, atol=1e-5, rtol=0)


def export_gguf(path: Path, name: str, model: torch.nn.Module, qtype: QType = QType.F32) -> Path:
    """As llama.cpp's converter writes Granite(-MoE): Llama's names and q/k permutation, the
    multipliers under the architecture's keys, input_linear split into gate and up experts."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_MOE if name == "granitemoe" else gguf.MODEL_ARCH.GRANITE,
                                     config.num_hidden_layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        array = value.float().numpy()
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        matrix_type = qtype if array.ndim >= 2 else QType.F32
        if hf_name.endswith("experts.gate_up_proj"):
            inner = config.intermediate_size
            for part, rows in (("gate", array[:, :inner]), ("up", array[:, inner:])):
                tensors[f"blk.{layer}.ffn_{part}_exps.weight"] = (encode(np.ascontiguousarray(rows), qtype), qtype)
            continue
        if hf_name.endswith("experts.down_proj"):
            tensors[f"blk.{layer}.ffn_down_exps.weight"] = (encode(array, qtype), qtype)
            continue
        if hf_name.endswith("router.weight"):
            tensors[f"blk.{layer}.ffn_gate_inp.weight"] = (array, QType.F32)
            continue
        if ".q_proj." in hf_name or ".k_proj." in hf_name:
            array = llama_cpp_permute(array, config.num_attention_heads if ".q_proj." in hf_name
                                      else config.num_key_value_heads)
        tensors[names.get_name(hf_name, try_suffixes=(".weight",))] = (encode(array, matrix_type), matrix_type)
    metadata = {**TINY_CONFIG, **config.to_dict(), "rope_theta": config.rope_parameters["rope_theta"]}
    scales = {"embedding_scale": config.embedding_multiplier, "residual_scale": config.residual_multiplier,
              "logit_scale": config.logits_scaling, "attention.scale": config.attention_multiplier}
    tokens = [f"tok{i}" for i in range(config.vocab_size)]
    return write_model(path, name, metadata, tensors, vocabulary=(tokens, [1] * len(tokens)), extra_metadata=scales)


@pytest.mark.parametrize("qtype", [QType.F32, QType.Q8_0])
def test_gguf_equals_its_folder(family, qtype, tmp_path):
    """F32: the folder's logits; Q8_0 (matrices and experts packed): its greedy tokens, the
    packed weights read natively against the same file dequantized to fp32."""
    name, reference, folder = family
    path = export_gguf(tmp_path / f"{name}.gguf", name, reference, qtype)
    llm = LLM(str(path), max_model_len=128)
    if qtype == QType.F32:
        assert llm.generate(PROMPT, GREEDY).token_ids == reference_greedy(reference)
        assert torch.allclose(prompt_logits(llm), prompt_logits(LLM(str(folder), max_model_len=128)), atol=1e-5, rtol=0)
    else:
        fp32 = LLM(str(path), max_model_len=128, weights="fp32")
        assert llm.generate(PROMPT, GREEDY).token_ids == fp32.generate(PROMPT, GREEDY).token_ids


def test_gguf_multiplier_must_be_a_positive_number(family, tmp_path):
    name, reference, _ = family
    path = export_gguf(tmp_path / f"{name}.gguf", name, reference)
    data = bytearray(path.read_bytes())
    at = data.find(f"{name}.residual_scale".encode()) + len(f"{name}.residual_scale") + 4   # past the type
    data[at:at + 4] = np.float32(-1.0).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="residual_scale must be a positive number"):
        LLM(str(path))


def test_planned_step_equals_its_eager_twin(family, tmp_path):
    """The four multipliers in the planned native step (a Q8_0 file, experts packed): alone and
    in a batch, the eager model's tokens and logprobs over the same packed weights."""
    name, reference, _ = family
    path = export_gguf(tmp_path / f"{name}-q8.gguf", name, reference, QType.Q8_0)
    planned, eager = LLM(str(path), max_num_seqs=3), LLM(str(path), max_num_seqs=3, planned_decode=False)
    assert planned.engine.runner.plan is not None and eager.engine.runner.plan is None
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5)
    prompts = [PROMPT, PROMPT[3:12], [7, 3]]
    for ours, theirs in zip(planned.generate(prompts, greedy), eager.generate(prompts, greedy)):
        assert ours.token_ids == theirs.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-4
    alone = planned.generate(PROMPT, greedy)
    assert alone.token_ids == eager.generate(PROMPT, greedy).token_ids
