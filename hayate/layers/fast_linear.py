"""Linear layers for fast CPU decode: weights in the smallest form a PyTorch kernel reads
directly, activations rounded to bf16 at each layer's input, outputs back in fp32.

- Int4Linear: GGUF Q4_0 / Q4_1 blocks repacked for `_weight_int4pack_mm_for_cpu`
  (groups of 32, w = (q - 8) * scale + zero, scale and zero in bf16).
- BF16Linear: any other weight, stored in bf16 (half the bytes of fp32).
Both are slow twins' fast siblings: tests compare them with the dequantized fp32 layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayate.layers.quant import PackedWeight, QType, dequantize

GROUP_SIZE = 32
INT4_TYPES = (QType.Q4_0, QType.Q4_1)


def unpack_q4(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 bytes -> (q [out, in] int32 in 0..15, scale, zero [out, in / 32] fp32)
    such that w = (q - 8) * scale + zero."""
    out_features, in_features = weight.shape
    block_bytes = 18 if weight.ggml_type == QType.Q4_0 else 20
    blocks = weight.data.reshape(-1, block_bytes)
    header = blocks[:, : block_bytes - 16].contiguous().view(torch.float16).float()  # [blocks, 1 or 2]
    nibbles = blocks[:, block_bytes - 16:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1).to(torch.int32)
    scale = header[:, 0]
    # Q4_1 stores w = d * q + m; rewrite as d * (q - 8) + (m + 8 d).
    zero = header[:, 1] + 8 * scale if weight.ggml_type == QType.Q4_1 else torch.zeros_like(scale)
    groups = in_features // GROUP_SIZE
    return (q.reshape(out_features, in_features), scale.reshape(out_features, groups),
            zero.reshape(out_features, groups))


class Int4Linear(nn.Module):
    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.ggml_type not in INT4_TYPES:
            raise ValueError(f"Int4Linear takes Q4_0 or Q4_1 weights, not {QType(weight.ggml_type).name}")
        self.out_features, self.in_features = weight.shape
        q, scale, zero = unpack_q4(weight)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [in / 32, out, 2]: the kernel's layout for per-group scale and zero.
        self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, GROUP_SIZE, self.scale_zero)
        y = y.float().reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class BF16Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


def fast_linear(module: nn.Module) -> nn.Module:
    """The fast sibling of an nn.Linear or PackedLinear."""
    weight = getattr(module, "weight")
    if isinstance(weight, PackedWeight):
        if weight.ggml_type in INT4_TYPES and weight.shape[1] % GROUP_SIZE == 0:
            return Int4Linear(weight, module.bias)
        return BF16Linear(dequantize(weight.data, weight.ggml_type, weight.shape), module.bias)
    return BF16Linear(weight, module.bias)


def convert_to_fast(model: nn.Module) -> nn.Module:
    """Swap every linear layer (nn.Linear or PackedLinear) for its fast sibling, in place."""
    from hayate.layers.linear import PackedLinear

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fast_linear(module))
    return model
