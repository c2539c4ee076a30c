"""Mixture-of-experts tensors in GGUF files, as llama.cpp's converter writes them: Mixtral
(architecture `llama` with experts), Qwen2-MoE, Qwen3-MoE, OLMoE and Granite-MoE.

A file counts its experts in `ARCH.expert_count` and `ARCH.expert_used_count`;
each layer has the router `blk.N.ffn_gate_inp.weight` ([experts, hidden], kept F32) and, in
place of the dense FFN, the experts' projections stacked into 3-D tensors
`blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` (torch order [experts, rows, columns]:
expert e is the slab [e]), of `ARCH.expert_feed_forward_length` rows where that is set. Older
Mixtral files hold one matrix per expert, `blk.N.ffn_gate.E.weight`. Qwen2-MoE adds a shared
expert (`ffn_gate/up/down_shexp`, an ordinary MLP) and its gate `ffn_gate_inp_shexp` (a vector).
The names given here are the ones models/mixtral.py stacks, or, for a quantized file, splits
into one packed layer per expert (gguf.py hands a 3-D tensor over as its rows stacked)."""
from __future__ import annotations

import re
from typing import Any, Mapping

from hayate.layers.quant import is_quantized

_LAYER = r"blk\.(0|[1-9]\d{0,8})\."
_ROUTER = re.compile(_LAYER + r"ffn_gate_inp\.weight")
_STACKED = re.compile(_LAYER + r"ffn_(gate|up|down)_exps\.weight")
_PER_EXPERT = re.compile(_LAYER + r"ffn_(gate|up|down)\.(0|[1-9]\d{0,8})\.weight")
_DENSE_FFN = re.compile(_LAYER + r"ffn_(gate|up|down)\.weight")
_SHARED = re.compile(_LAYER + r"ffn_(gate|up|down)_shexp\.weight")
_SHARED_GATE = re.compile(_LAYER + r"ffn_gate_inp_shexp\.weight")
# Architectures that always have experts, and those that renormalise the chosen experts'
# weights when the file does not say (llama.cpp's graphs: Mixtral and Qwen3-MoE do).
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe", "olmoe", "granitemoe")
_RENORMALISED = ("llama", "qwen3moe", "granitemoe")   # (Granite-MoE: a softmax over the chosen logits)
# GGUF part -> the stacked name (models/mixtral.py) and a hub checkpoint's per-expert name
_STACKED_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_PER_EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
MAX_EXPERTS = 1024   # more than any released model has (DeepSeek-V3: 256, Qwen3-Next: 512)


def expert_hf_name(gguf_name: str) -> str | None:
    """The Hugging Face style name of an expert or router tensor; None for any other tensor."""
    if match := _ROUTER.fullmatch(gguf_name):
        return f"model.layers.{match[1]}.mlp.gate.weight"
    if match := _STACKED.fullmatch(gguf_name):
        return f"model.layers.{match[1]}.mlp.experts.{_STACKED_NAMES[match[2]]}.weight"
    if match := _PER_EXPERT.fullmatch(gguf_name):
        return f"model.layers.{match[1]}.block_sparse_moe.experts.{match[3]}.{_PER_EXPERT_NAMES[match[2]]}.weight"
    if match := _SHARED.fullmatch(gguf_name):
        return f"model.layers.{match[1]}.mlp.shared_expert.{_STACKED_NAMES[match[2]]}.weight"
    if match := _SHARED_GATE.fullmatch(gguf_name):
        return f"model.layers.{match[1]}.mlp.shared_expert_gate.weight"
    return None


def expert_settings(metadata: Mapping[str, Any], architecture: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json's expert settings for a file with experts (checked by with_experts
    first); nothing for a dense file."""
    experts = metadata.get(f"{architecture}.expert_count")
    if not experts:
        return {}
    settings = {"num_local_experts": int(experts), "num_experts_per_tok": int(metadata[f"{architecture}.expert_used_count"])}
    if architecture == "llama":
        settings["model_type"] = "mixtral"
    if inner := metadata.get(f"{architecture}.expert_feed_forward_length"):
        settings["moe_intermediate_size"] = int(inner)
    if (shared := tensors.get("blk.0.ffn_up_shexp.weight")) is not None:
        settings["shared_expert_intermediate_size"] = int(shared.shape[-1])   # its rows
    norm = metadata.get(f"{architecture}.expert_weights_norm")
    settings["norm_topk_prob"] = bool(norm) if norm is not None else architecture in _RENORMALISED
    return settings


def with_experts(meta: Any, tensors: Mapping[str, Any], dims: Any,
                 expected: dict[str, tuple[tuple[int, ...], str, bool]]) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """`expected` (gguf_checks: name -> (torch-order shape, the keys that imply it, required))
    with a file's experts and routers in place of its dense FFN, where its metadata counts
    experts; `meta` is gguf_checks.Metadata, whose fail() makes the GGUFError."""
    count_key, used_key = meta.key("expert_count"), meta.key("expert_used_count")
    if not meta.get(count_key):   # absent, or 0 as some dense files write it
        if meta.architecture in MOE_ARCHITECTURES:
            raise meta.fail(f"a {meta.architecture} model has experts, but {count_key} is missing or 0")
        return expected
    if meta.architecture not in ("llama", *MOE_ARCHITECTURES):
        raise meta.fail(f"{count_key} is set, but hayate reads experts only in llama (Mixtral), "
                        f"{', '.join(MOE_ARCHITECTURES)} files")
    experts = meta.integer(count_key, maximum=MAX_EXPERTS)
    used = meta.integer(used_key, required=True)
    if used > experts:
        raise meta.fail(f"{used_key} is {used}, more than {count_key} ({experts})")
    per_expert = "blk.0.ffn_gate.0.weight" in tensors
    if per_expert and len(tensors) < 3 * experts * dims.layers:
        raise meta.fail(f"{count_key} is {experts}, but the file has too few tensors for its per-expert weights")
    inner_key = meta.key("expert_feed_forward_length")
    inner = meta.integer(inner_key) or dims.ffn
    keys = (f"{count_key}={experts}, {meta.key('embedding_length')}={dims.hidden}, "
            f"{inner_key if meta.get(inner_key) else meta.key('feed_forward_length')}={inner}")
    shapes = {"gate": (inner, dims.hidden), "up": (inner, dims.hidden), "down": (dims.hidden, inner)}
    result = {name: entry for name, entry in expected.items() if not _DENSE_FFN.fullmatch(name)}
    _shared_expert(meta, tensors, dims, result)
    for layer in range(dims.layers):
        result[f"blk.{layer}.ffn_gate_inp.weight"] = ((experts, dims.hidden), keys, True)
        for part, shape in shapes.items():
            if not per_expert:
                result[f"blk.{layer}.ffn_{part}_exps.weight"] = ((experts, *shape), keys, True)
                continue
            for expert in range(experts):
                result[f"blk.{layer}.ffn_{part}.{expert}.weight"] = (shape, keys, True)
    return result


def _shared_expert(meta: Any, tensors: Mapping[str, Any], dims: Any,
                   result: dict[str, tuple[tuple[int, ...], str, bool]]) -> None:
    """A Qwen2-MoE file's shared expert in every layer, of the size its first layer's has."""
    first = tensors.get("blk.0.ffn_up_shexp.weight")
    if first is None or meta.architecture != "qwen2moe":   # elsewhere, a tensor with no place
        return
    inner = int(first.shape[-1])
    keys = f"blk.0.ffn_up_shexp.weight's {inner} rows, {meta.key('embedding_length')}={dims.hidden}"
    for layer in range(dims.layers):
        result[f"blk.{layer}.ffn_gate_shexp.weight"] = ((inner, dims.hidden), keys, True)
        result[f"blk.{layer}.ffn_up_shexp.weight"] = ((inner, dims.hidden), keys, True)
        result[f"blk.{layer}.ffn_down_shexp.weight"] = ((dims.hidden, inner), keys, True)
        gate = f"blk.{layer}.ffn_gate_inp_shexp.weight"   # a vector, or a [1, hidden] matrix
        matrix = gate in tensors and len(tensors[gate].shape) == 2
        result[gate] = ((1, dims.hidden) if matrix else (dims.hidden,), keys, True)


def held_nbytes(gguf_name: str, tensor: Any) -> int:
    """Bytes a tensor takes loaded with the weights kept packed: quantized experts as stored
    (each expert a packed layer), float experts in fp32, any other tensor as stored."""
    hf_name = expert_hf_name(gguf_name)
    if hf_name is not None and ".experts." in hf_name and not is_quantized(int(tensor.tensor_type)):
        return 4 * int(tensor.n_elements)
    return int(tensor.n_bytes)
