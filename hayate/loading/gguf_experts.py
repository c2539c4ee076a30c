"""Mixture-of-experts tensors in GGUF files: Mixtral as llama.cpp's converter writes it.

A Mixtral file has architecture `llama` plus `llama.expert_count` and `llama.expert_used_count`;
each layer has the router `blk.N.ffn_gate_inp.weight` ([experts, hidden], kept F32) and, in
place of the dense FFN, the experts' projections stacked into 3-D tensors
`blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` (torch order [experts, rows, columns]:
expert e is the slab [e]). Older files hold one matrix per expert, `blk.N.ffn_gate.E.weight`.
The names given here are the ones models/mixtral.py stacks; 3-D tensors are decoded to fp32
at load (gguf.py packs only matrices)."""
from __future__ import annotations

import re
from typing import Any, Mapping

_LAYER = r"blk\.(0|[1-9]\d{0,8})\."
_ROUTER = re.compile(_LAYER + r"ffn_gate_inp\.weight")
_STACKED = re.compile(_LAYER + r"ffn_(gate|up|down)_exps\.weight")
_PER_EXPERT = re.compile(_LAYER + r"ffn_(gate|up|down)\.(0|[1-9]\d{0,8})\.weight")
_DENSE_FFN = re.compile(_LAYER + r"ffn_(gate|up|down)\.weight")
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
    return None


def expert_settings(metadata: Mapping[str, Any], architecture: str) -> dict[str, Any]:
    """A config.json's Mixtral settings for a file with experts (checked by with_experts
    first); nothing for a dense file."""
    experts = metadata.get(f"{architecture}.expert_count")
    if not experts:
        return {}
    return {"model_type": "mixtral", "num_local_experts": int(experts),
            "num_experts_per_tok": int(metadata[f"{architecture}.expert_used_count"])}


def with_experts(meta: Any, tensors: Mapping[str, Any], dims: Any,
                 expected: dict[str, tuple[tuple[int, ...], str, bool]]) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """`expected` (gguf_checks: name -> (torch-order shape, the keys that imply it, required))
    with a file's experts and routers in place of its dense FFN, where its metadata counts
    experts; `meta` is gguf_checks.Metadata, whose fail() makes the GGUFError."""
    count_key, used_key = meta.key("expert_count"), meta.key("expert_used_count")
    if not meta.get(count_key):   # absent, or 0 as some dense files write it
        return expected
    if meta.architecture != "llama":
        raise meta.fail(f"{count_key} is set, but hayate reads experts only in llama (Mixtral) files")
    experts = meta.integer(count_key, maximum=MAX_EXPERTS)
    used = meta.integer(used_key, required=True)
    if used > experts:
        raise meta.fail(f"{used_key} is {used}, more than {count_key} ({experts})")
    per_expert = "blk.0.ffn_gate.0.weight" in tensors
    if per_expert and len(tensors) < 3 * experts * dims.layers:
        raise meta.fail(f"{count_key} is {experts}, but the file has too few tensors for its per-expert weights")
    keys = (f"{count_key}={experts}, {meta.key('embedding_length')}={dims.hidden}, "
            f"{meta.key('feed_forward_length')}={dims.ffn}")
    shapes = {"gate": (dims.ffn, dims.hidden), "up": (dims.ffn, dims.hidden), "down": (dims.hidden, dims.ffn)}
    result = {name: entry for name, entry in expected.items() if not _DENSE_FFN.fullmatch(name)}
    for layer in range(dims.layers):
        result[f"blk.{layer}.ffn_gate_inp.weight"] = ((experts, dims.hidden), keys, True)
        for part, shape in shapes.items():
            if not per_expert:
                result[f"blk.{layer}.ffn_{part}_exps.weight"] = ((experts, *shape), keys, True)
                continue
            for expert in range(experts):
                result[f"blk.{layer}.ffn_{part}.{expert}.weight"] = (shape, keys, True)
    return result


def held_nbytes(gguf_name: str, tensor: Any) -> int:
    """Bytes a tensor takes loaded with the weights kept packed: experts' weights are decoded to
    fp32 (for now: the experts run eagerly in float), any other tensor as stored."""
    hf_name = expert_hf_name(gguf_name)
    if hf_name is not None and not hf_name.endswith(".mlp.gate.weight"):
        return 4 * int(tensor.n_elements)
    return int(tensor.n_bytes)
