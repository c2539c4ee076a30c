"""Fusing linear layers that read the same input (q/k/v, gate/up) into one, at load time:
one matmul or kernel call instead of several, the same values row for row."""
from __future__ import annotations

import torch
from torch import nn

from hayate.kernels import native_kernels
from hayate.layers.linear import PackedLinear
from hayate.layers.quant import NATIVE_TYPES, PackedWeight


def fuse_linears(layers: list[nn.Module], packed_apart: bool = False) -> nn.Module | None:
    """One layer whose output rows are the given layers' rows, stacked in order; None when
    they cannot be stacked (different kinds or weight formats), or when packed_apart and they
    are packed layers the VNNI kernel will take side by side (fusing would only copy them)."""
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if all(type(layer) is nn.Linear for layer in layers):
        weight = torch.cat([layer.weight.detach() for layer in layers])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    if all(type(layer) is PackedLinear for layer in layers) and len({l.ggml_type for l in layers}) == 1:
        if packed_apart and _rearranged(layers[0].ggml_type):
            return None   # the VNNI kernel takes them side by side, one pass over the input: no copy
        data = torch.cat([layer.packed for layer in layers])
        shape = (sum(layer.out_features for layer in layers), layers[0].in_features)
        return PackedLinear(PackedWeight(data, layers[0].ggml_type, shape), bias)
    return None


def _rearranged(ggml_type: int) -> bool:
    """Whether layers of this type will be rearranged for the VNNI kernel (rearrange_for_vnni)."""
    kernels = native_kernels()
    return ggml_type in NATIVE_TYPES and kernels is not None and hasattr(kernels, "InterleavedWeight")
