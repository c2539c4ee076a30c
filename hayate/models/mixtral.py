"""Mixtral and the other mixtures of experts (Qwen2-MoE, Qwen3-MoE, OLMoE): the Llama decoder
with a sparse mixture of SwiGLU experts (layers/moe.py) as its layers' MLP, which
LlamaDecoderLayer builds when the config has experts (Qwen-MoE may keep some layers dense).

Checkpoints name the experts' weights three ways, all stacked at load into one tensor per
projection ([experts, rows, columns]; gate and up in one, gate rows first):
- Hub folders: one matrix per expert, `block_sparse_moe.experts.E.w1/w3/w2.weight` (Mixtral:
  gate, up, down) or `mlp.experts.E.gate_proj/up_proj/down_proj.weight` (Qwen-MoE, OLMoE), as
  transformers still saves them;
- transformers 5's own modules: `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`;
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


class MixtralForCausalLM(LlamaForCausalLM):
    # Which rows each expert gets depends on the routing: no fixed-shape (CUDA graph) step, and
    # no planned native step (decode_plan.py plans LlamaForCausalLM itself only).
    static_shapes = False

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        if not config.num_local_experts:
            raise ValueError("a mixture-of-experts config needs its number of experts and num_experts_per_tok")
        super().__init__(config, max_positions)

    def load_weights(self, weights: Iterable[tuple[str, WeightValue]]) -> None:
        written: dict[str, int] = {}   # stacked parameter -> elements written
        rest = _without_experts(self, without_tied_head(self.config, weights), written)
        load_named_weights(self, rest, skip=("rotary_emb.inv_freq", *_STACKED))
        for name, param in self.named_parameters():
            if name.endswith(_STACKED) and written.get(name, 0) != param.numel():
                raise ValueError(f"checkpoint lacks some experts' weights of {name}")
        finish_loading(self, self.model)


def _without_experts(model: MixtralForCausalLM, weights: Iterable[tuple[str, WeightValue]],
                     written: dict[str, int]) -> Iterable[tuple[str, WeightValue]]:
    """The weights less the experts', which are copied here into their slabs of the stacked
    parameters (`written` counts what each got); the router renamed to the block's `mlp.gate`."""
    for name, value in weights:
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
        target = getattr(mlp.experts, stacked)
        if expert is not None:
            target = target[int(expert)]
        if half is not None:
            inner = mlp.experts.inner
            target = target.narrow(-2, half * inner, inner)
        _copy_slab(name, target, value)
        key = f"model.layers.{layer}.mlp.experts.{stacked}"
        written[key] = written.get(key, 0) + target.numel()


def _copy_slab(name: str, target: torch.Tensor, value: WeightValue) -> None:
    if isinstance(value, PackedWeight):   # experts run in float for now: decoded at load
        value = value.dequantize()
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"weight {name} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)
