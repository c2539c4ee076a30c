"""Linear layers for fast decode: weights in the smallest form a PyTorch kernel reads
directly, activations rounded to bf16 at each layer's input, outputs in the input's dtype.

- Int4Linear: GGUF Q4_0 / Q4_1 blocks repacked for PyTorch's int4 kernel of the device
  (`_weight_int4pack_mm_for_cpu`, or tinygemm's `_weight_int4pack_mm` on CUDA): groups of
  32, w = (q - 8) * scale + zero, scale and zero in bf16.
- BF16Linear: any other weight, stored in bf16 (half the bytes of fp32).
Both are slow twins' fast siblings: tests compare them with the dequantized fp32 layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayate.layers.quant import PackedWeight, QType, dequantize

GROUP_SIZE = 32
INT4_TYPES = (QType.Q4_0, QType.Q4_1)
INNER_K_TILES = (8, 4, 2)   # tinygemm's tilings of the input dimension, widest first


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


def int4_fits(shape: tuple[int, int], device: torch.device) -> bool:
    """Whether the device's int4 kernel takes an [out, in] weight: whole groups, and on CUDA
    output rows in eights and the input in tinygemm's tiles (multiples of 32)."""
    out_features, in_features = shape
    if device.type == "cpu":
        return in_features % GROUP_SIZE == 0
    return device.type == "cuda" and in_features % 32 == 0 and out_features % 8 == 0


def cuda_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [out, in / 2] bytes, even columns in the high nibble: the
    input `_convert_weight_to_int4pack` (CUDA) expects."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """q [out, in] int32 0..15 in the layout of the device's int4 matmul."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    tiles = next(tiles for tiles in INNER_K_TILES if q.shape[1] % (16 * tiles) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(cuda_nibbles(q).to(device), tiles)


class Int4Linear(nn.Module):
    """Packed for one device (`device`), whose kernel's layout it holds: build it there
    rather than move it."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        device = torch.device(device)
        if weight.ggml_type not in INT4_TYPES:
            raise ValueError(f"Int4Linear takes Q4_0 or Q4_1 weights, not {QType(weight.ggml_type).name}")
        self.out_features, self.in_features = weight.shape
        q, scale, zero = unpack_q4(weight)
        self.register_buffer("packed", pack_int4(q, device))
        # [in / 32, out, 2]: the kernels' layout for per-group scale and zero.
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("scale_zero", scale_zero.to(device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().to(device), requires_grad=False)
        self._matmul = (torch.ops.aten._weight_int4pack_mm_for_cpu if device.type == "cpu"
                        else torch.ops.aten._weight_int4pack_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, GROUP_SIZE,
                         self.scale_zero)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class BF16Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


def fast_linear(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """The fast sibling of an nn.Linear or PackedLinear; an int4 one is packed for `device`
    (a bf16 one stays where the module is, for model.to() to move)."""
    weight = getattr(module, "weight")
    if isinstance(weight, PackedWeight):
        if weight.ggml_type in INT4_TYPES and int4_fits(weight.shape, torch.device(device)):
            return Int4Linear(weight, module.bias, device)
        return BF16Linear(dequantize(weight.data, weight.ggml_type, weight.shape), module.bias)
    return BF16Linear(weight, module.bias)


def convert_to_fast(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Swap every linear layer (nn.Linear or PackedLinear) for its fast sibling, in place."""
    from hayate.layers.linear import PackedLinear

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fast_linear(module, device))
    return model
