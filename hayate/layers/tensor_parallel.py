"""Tensor parallelism, Megatron's way: each rank keeps a slice of every layer and the ranks add
their partial outputs once after attention and once after the MLP.

q/k/v are split by output (whole key-value head groups: each rank attends with its own heads
over its own slice of the KV cache), o_proj by input; gate/up by output, down_proj by input;
a mixture of experts either the same way inside every expert, or (expert parallel) by whole
experts. Embeddings, norms, the router and the head stay whole on every rank. Splits need not
be even: the default model's 3 key-value heads go 2 + 1 on two ranks. A packed weight is cut
on block boundaries, so its slice keeps the file's bytes; where a cut would split a block,
that slice is dequantized to fp32 (the same values, more memory)."""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch
from torch import nn

from hayate.layers.linear import PackedLinear, packed_linears, rearrange_for_vnni, share_workspace
from hayate.layers.moe import Experts, SparseMoE
from hayate.layers.quant import PackedWeight, QType


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def split(self, units: int) -> tuple[int, int]:
        """This rank's [start, end) of `units` split into world contiguous parts, the first
        `units % world` parts one unit larger."""
        base, extra = divmod(units, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)


class PartialSums:
    """Adds the ranks' partial outputs with torch.distributed: for two ranks one exchange of
    send/recv (a quarter of gloo's allreduce latency, measured), for more an all-gather; either
    way summed in rank order, so every rank holds the same bits."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        partial = partial.contiguous()
        if self.world == 2:
            other = torch.empty_like(partial)
            sent = self.group.send([partial], 1 - self.rank, 0)
            self.group.recv([other], 1 - self.rank, 0).wait()
            sent.wait()
            return partial + other if self.rank == 0 else other + partial
        parts = [torch.empty_like(partial) for _ in range(self.world)]
        self.group.allgather([parts], [partial]).wait()
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


class Summed(nn.Module):
    """A module whose output on each rank is a partial sum: the ranks' outputs are added, then
    the bias (kept whole, added once on every rank, so the ranks stay identical)."""

    def __init__(self, inner: nn.Module, sums: PartialSums, bias: torch.Tensor | None = None):
        super().__init__()
        self.inner, self.sums = inner, sums
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sums(self.inner(x))
        return out if self.bias is None else out + self.bias


def shard_model(model: nn.Module, shard: Shard, sums: PartialSums, expert_parallel: bool = False) -> tuple[int, int]:
    """Cut a loaded Llama-family model (Llama, Qwen2/3, Mistral, Gemma 3, the MoE families) down
    to this rank's slices, in place. Returns this rank's (query heads, key-value heads)."""
    layers = model.model.layers
    heads = None
    for layer in layers:
        heads = _shard_attention(layer.self_attn, shard, sums)
        if isinstance(layer.mlp, SparseMoE):
            _shard_moe(layer.mlp, shard, expert_parallel)
            layer.mlp = Summed(layer.mlp, sums)
        else:
            layer.mlp = _shard_mlp(layer.mlp, shard, sums)
    share_workspace(model)
    rearrange_for_vnni(packed_linears(model))
    return heads


def check_shardable(config, world: int) -> None:
    """Refuse, before anything loads, a model that cannot be split over `world` ranks."""
    if config.num_key_value_heads < world:
        raise ValueError(f"tensor parallel {world} needs at least {world} key-value heads; "
                         f"the model has {config.num_key_value_heads}")
    if config.qk_norm == "full":
        raise ValueError("tensor parallel cannot split a norm over whole q/k projections (OLMoE) yet")


def _shard_attention(attention: nn.Module, shard: Shard, sums: PartialSums) -> tuple[int, int]:
    heads, kv_heads, head_dim = attention.shape
    group = heads // kv_heads
    k0, k1 = shard.split(kv_heads)
    q_rows = (k0 * group * head_dim, k1 * group * head_dim)
    kv_rows = (k0 * head_dim, k1 * head_dim)
    if attention.qkv_proj is not None:
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        attention.qkv_proj = take_rows(attention.qkv_proj, [q_rows, _shifted(kv_rows, q_end), _shifted(kv_rows, k_end)])
    else:
        attention.q_proj = take_rows(attention.q_proj, [q_rows])
        attention.k_proj = take_rows(attention.k_proj, [kv_rows])
        attention.v_proj = take_rows(attention.v_proj, [kv_rows])
    bias = attention.o_proj.bias
    attention.o_proj = Summed(take_columns(attention.o_proj, *q_rows), sums,
                              None if bias is None else bias.detach().clone())
    local = ((k1 - k0) * group, k1 - k0)
    attention.shape = (*local, head_dim)
    attention.attn.num_heads, attention.attn.num_kv_heads = local
    return local


def _shard_mlp(mlp: nn.Module, shard: Shard, sums: PartialSums | None) -> nn.Module:
    """gate/up by output, down by input, cut where down's blocks allow; Summed unless sums is None
    (a shared expert's share, added up with its MoE's)."""
    down = mlp.down_proj
    unit = _block_elements(down)
    start, end = (unit * i for i in shard.split(down.in_features // unit))
    inner = down.in_features
    if mlp.gate_up_proj is not None:
        mlp.gate_up_proj = take_rows(mlp.gate_up_proj, [(start, end), (inner + start, inner + end)])
    else:
        mlp.gate_proj = take_rows(mlp.gate_proj, [(start, end)])
        mlp.up_proj = take_rows(mlp.up_proj, [(start, end)])
    bias = down.bias
    mlp.down_proj = take_columns(down, start, end)
    if sums is None:   # the MoE's Summed adds it up; a shared expert's down_proj has no bias
        return mlp
    return Summed(mlp, sums, None if bias is None else bias.detach().clone())


def _shard_moe(moe: SparseMoE, shard: Shard, expert_parallel: bool) -> None:
    """Each expert's inner dimension split (tensor parallel), or whole experts dealt out (expert
    parallel, the shared expert then on rank 0 alone); the router stays whole."""
    experts = moe.experts
    if expert_parallel:
        experts.keep(range(*shard.split(experts.num_experts)))
        if shard.rank != 0:
            moe.shared_expert = moe.shared_expert_gate = None
        return
    if moe.shared_expert is not None:
        if moe.shared_expert.down_proj.bias is not None:
            raise ValueError("tensor parallel cannot split a shared expert with a bias")
        moe.shared_expert = _shard_mlp(moe.shared_expert, shard, None)
    _split_experts(experts, shard)


def _split_experts(experts: Experts, shard: Shard) -> None:
    if experts.packed is None:
        start, end = shard.split(experts.inner)
        gate_up, down, inner = experts.gate_up_proj.data, experts.down_proj.data, experts.inner
        experts.gate_up_proj = nn.Parameter(torch.cat([gate_up[:, start:end], gate_up[:, inner + start:inner + end]], 1)
                                            .contiguous(), requires_grad=False)
        experts.down_proj = nn.Parameter(down[:, :, start:end].contiguous(), requires_grad=False)
        experts.inner = end - start
        return
    unit = _block_elements(experts.packed[0][2])
    start, end = (unit * i for i in shard.split(experts.inner // unit))
    for parts in experts.packed:
        gate, up, down = parts
        parts[0], parts[1] = take_rows(gate, [(start, end)]), take_rows(up, [(start, end)])
        parts[2] = take_columns(down, start, end)
    experts.inner = end - start


def _shifted(rows: tuple[int, int], by: int) -> tuple[int, int]:
    return rows[0] + by, rows[1] + by


def _block_elements(layer: nn.Module) -> int:
    """Weights per block along a row of the layer's weight (1 for a float layer)."""
    return gguf.GGML_QUANT_SIZES[QType(layer.ggml_type)][0] if isinstance(layer, PackedLinear) else 1


def take_rows(layer: nn.Module, ranges: list[tuple[int, int]]) -> nn.Module:
    """A layer with the given ranges of the layer's output rows, stacked in order (bias too)."""
    bias = None if layer.bias is None else torch.cat([layer.bias.detach()[a:b] for a, b in ranges])
    if isinstance(layer, PackedLinear):
        weight = layer.weight
        data = torch.cat([weight.data.reshape(layer.out_features, -1)[a:b] for a, b in ranges])
        shape = (sum(b - a for a, b in ranges), layer.in_features)
        return PackedLinear(PackedWeight(data.contiguous(), layer.ggml_type, shape), bias)
    return _linear(torch.cat([layer.weight.detach()[a:b] for a, b in ranges]), bias)


def take_columns(layer: nn.Module, start: int, end: int) -> nn.Module:
    """A layer with input columns [start, end) of the layer's weight and no bias (the caller adds
    it once, after the ranks' sums). A packed layer keeps its blocks where the cut falls on block
    boundaries and is dequantized otherwise."""
    if isinstance(layer, PackedLinear):
        elements, type_size = gguf.GGML_QUANT_SIZES[QType(layer.ggml_type)]
        weight = layer.weight
        if start % elements == 0 and end % elements == 0:
            rows = weight.data.reshape(layer.out_features, -1)
            data = rows[:, start // elements * type_size:end // elements * type_size].contiguous()
            return PackedLinear(PackedWeight(data, layer.ggml_type, (layer.out_features, end - start)))
        return _linear(weight.dequantize()[:, start:end].contiguous(), None)
    return _linear(layer.weight.detach()[:, start:end].contiguous(), None)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer
