"""Mixtral and the other mixtures of experts (Qwen2-MoE, Qwen3-MoE, OLMoE, Granite-MoE): the Llama decoder
with a sparse mixture of SwiGLU experts (layers/moe.py) as its layers' MLP, which
LlamaDecoderLayer builds when the config has experts (Qwen-MoE may keep some layers dense).

Checkpoints name the experts' weights three ways, all stacked at load into one tensor per
projection ([experts, rows, columns]; gate and up in one, gate rows first):
- Hub folders: one matrix per expert, `block_sparse_moe.experts.E.w1/w3/w2.weight` (Mixtral:
  gate, up, down) or `mlp.experts.E.gate_proj/up_proj/down_proj.weight` (Qwen-MoE, OLMoE), as
  transformers still saves them;
- transformers 5's own modules: `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`
  (Granite-MoE's folders: `block_sparse_moe.input_linear` / `output_linear`, `router.layer`);
- GGUF (loading/gguf_experts.py names them): `mlp.experts.gate_proj/up_proj/down_proj.weight`,
  each stacked over the experts (`ffn_*_exps`), or the older per-expert matrices."""
from __future__ import annotations

import re
from typing import Iterable

import torch

from hayate.layers.moe import SparseMoE
from hayate.layers.quant import PackedWeight
from hayate.models.config import ModelConfig
from hayate.models.llama import LlamaForCausalLM, finish_loading, without_tied_head
from hayate.models.weights import WeightValue, load_named_weights

# A checkpoint's expert weight: its layer, expert (None: stacked over all) and part.
_EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\."
                          r"(?:(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight|(gate_up_proj|down_proj|gate_proj|up_proj)(?:\.weight)?)")
# part -> (stacked parameter, which half of its rows: 0 gate, 1 up, None all)
_PARTS = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
          "gate_up_proj": ("gate_up_proj", None), "down_proj": ("down_proj", None)}
_STACKED = ("experts.gate_up_proj", "experts.down_proj")
# Granite-MoE's folders: gate and up stacked as input_linear, down as output_linear, the router's
# linear as router.layer
_GRANITE_NAMES = ((".block_sparse_moe.input_linear.weight", ".block_sparse_moe.experts.gate_up_proj"),
                  (".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj"),
                  (".block_sparse_moe.router.layer.", ".block_sparse_moe.gate."))


class MixtralForCausalLM(LlamaForCausalLM):
    # Which rows each expert gets depends on the routing: no fixed-shape (CUDA graph) step. The
    # planned native step takes packed experts, and a shared expert (decode_plan.py).
    static_shapes = False

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        if not config.num_local_experts:
            raise ValueError("a mixture-of-experts config needs its number of experts and num_experts_per_tok")
        super().__init__(config, max_positions)

    def load_weights(self, weights: Iterable[tuple[str, WeightValue]]) -> None:
        written: dict[str, int] = {}   # stacked parameter -> elements written
        packed: dict[tuple[int, str, int], PackedWeight] = {}   # (layer, gate/up/down, expert) -> blocks
        rest = _without_experts(self, without_tied_head(self.config, weights), written, packed)
        load_named_weights(self, rest, skip=("rotary_emb.inv_freq", *_STACKED))
        _place_packed(self, packed, written)
        for name, param in self.named_parameters():
            if name.endswith(_STACKED) and written.get(name, 0) != param.numel():
                raise ValueError(f"checkpoint lacks some experts' weights of {name}")
        finish_loading(self, self.model)


def _place_packed(model: MixtralForCausalLM, packed: dict[tuple[int, str, int], PackedWeight],
                  written: dict[str, int]) -> None:
    """Each layer whose experts all came packed (every expert's gate, up and down) runs them
    packed; a layer with some in float gets its packed ones decoded into the float slabs."""
    experts = model.config.num_local_experts
    for layer in sorted({key[0] for key in packed}):
        block = model.model.layers[layer].mlp.experts
        parts = {part: [packed.get((layer, part, e)) for e in range(experts)] for part in _PACKED_PARTS}
        if all(w is not None for ws in parts.values() for w in ws):
            for part, ws in parts.items():
                if any(tuple(w.shape) != _expert_shape(block, part) for w in ws):
                    raise ValueError(f"layer {layer}'s experts' {part} weights have shape {tuple(ws[0].shape)}, "
                                     f"model expects {_expert_shape(block, part)}")
            block.use_packed(parts["gate"], parts["up"], parts["down"])
            written.update({f"model.layers.{layer}.mlp.{name}": 0 for name in _STACKED})   # now empty
            continue
        for part, ws in parts.items():
            target = block.down_proj if part == "down" else block.gate_up_proj.narrow(
                -2, _PACKED_PARTS.index(part) * block.inner, block.inner)
            key = f"model.layers.{layer}.mlp.{_STACKED[1] if part == 'down' else _STACKED[0]}"
            for expert, weight in enumerate(ws):
                if weight is not None:
                    _copy_slab(f"model.layers.{layer}.mlp.experts.{part} (expert {expert})", target[expert], weight)
                    written[key] = written.get(key, 0) + target[expert].numel()


_PACKED_PARTS = ("gate", "up", "down")


def _expert_shape(block, part: str) -> tuple[int, int]:
    return (block.hidden, block.inner) if part == "down" else (block.inner, block.hidden)


def _without_experts(model: MixtralForCausalLM, weights: Iterable[tuple[str, WeightValue]],
                     written: dict[str, int], packed: dict) -> Iterable[tuple[str, WeightValue]]:
    """The weights less the experts', which are copied here into their slabs of the stacked
    parameters (`written` counts what each got), or kept in `packed` per expert where they
    come as GGUF blocks; the router renamed to the block's `mlp.gate`."""
    for name, value in weights:
        for granite, ours in _GRANITE_NAMES:
            name = name.replace(granite, ours)
        match = _EXPERT_NAME.fullmatch(name)
        if match is None:
            yield name.replace(".block_sparse_moe.", ".mlp."), value
            continue
        layer, expert, part = int(match[1]), match[2], match[3] or match[4]
        stacked, half = _PARTS[part]
        if expert is not None and int(expert) >= model.config.num_local_experts:
            raise ValueError(f"checkpoint has an unexpected weight {name}")
        mlp = model.model.layers[layer].mlp if layer < len(model.model.layers) else None
        if not isinstance(mlp, SparseMoE):
            raise ValueError(f"checkpoint has an unexpected weight {name}")
        if isinstance(value, PackedWeight) and part != "gate_up_proj":
            _keep_packed(packed, layer, _PACKED_PARTS[2 if half is None else half], expert, value, mlp.experts)
            continue
        target = getattr(mlp.experts, stacked)
        if expert is not None:
            target = target[int(expert)]
        if half is not None:
            inner = mlp.experts.inner
            target = target.narrow(-2, half * inner, inner)
        _copy_slab(name, target, value)
        key = f"model.layers.{layer}.mlp.experts.{stacked}"
        written[key] = written.get(key, 0) + target.numel()


def _keep_packed(packed: dict, layer: int, part: str, expert: str | None, value: PackedWeight, block) -> None:
    """One expert's blocks, or (expert None) all experts' stacked rows split into each one's."""
    if expert is not None:
        packed[(layer, part, int(expert))] = value
        return
    rows = value.shape[0] // block.num_experts
    if rows * block.num_experts != value.shape[0]:
        raise ValueError(f"layer {layer}'s stacked experts' {part} weights have {value.shape[0]} rows "
                         f"for {block.num_experts} experts")
    for e in range(block.num_experts):
        packed[(layer, part, e)] = PackedWeight(value.data[e * rows:(e + 1) * rows], value.ggml_type,
                                                (rows, value.shape[1]))


def _copy_slab(name: str, target: torch.Tensor, value: WeightValue) -> None:
    if isinstance(value, PackedWeight):   # beside float experts of the same layer: decoded
        value = value.dequantize()
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"weight {name} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)
