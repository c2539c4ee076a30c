"""The vision encoder's precision: fp32 (the default, exact to the checkpoint) or bf16, whose
linear layers keep their weights in bfloat16 and round their inputs to it.

A vision tower is compute-bound (a 640x480 photo through SmolVLM's tower is ~2.8 TFLOP), so it
runs at the CPU's matrix rate, not its memory bandwidth: oneDNN's bf16 GEMM (AVX512-BF16 on
Zen 4 and Cooper Lake or later, AMX on Sapphire Rapids) does 2-2.5x the fp32 rate on the same
cores. The matrix products' inputs round to bf16 and their products accumulate in fp32 in the
GEMM, whose output rounds to bf16 once (PyTorch's CPU GEMM has no bf16-in, fp32-out form).
Outputs that only feed another product (q, k and v into attention, the first MLP layer into
its activation) stay bf16; the others return to fp32, where the residual stream, the biases
after them and the layer norms stay. Attention over bf16 q, k, v runs in a native AVX512-BF16
kernel (kernels/vision_attention.cpp; PyTorch's CPU flash attention is no faster in bf16
than in fp32 without AMX). The error all this adds is measured, not assumed:
`bench/vision_exactness.py`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayate.kernels import native_kernels

VISION_PRECISIONS = ("fp32", "bf16")
# Linear layers of the encoder (encoder.py) and projectors (llava.py) whose output only feeds
# another bf16 product: it stays bf16.
_FEEDS_A_PRODUCT = frozenset({"q_proj", "k_proj", "v_proj", "fc1", "linear_1"})


class Bf16Linear(nn.Module):
    """nn.Linear with its weight in bfloat16: x rounded to bf16, products accumulated in fp32
    by the GEMM, its output rounded to bf16; returned in fp32 with the bias added in fp32, or in
    bf16 with the bias in the GEMM (`bf16_out`)."""

    def __init__(self, linear: nn.Linear, bf16_out: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bf16_out = linear.in_features, linear.out_features, bf16_out
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.bias = None if bias is None else \
            nn.Parameter(bias.to(torch.bfloat16 if bf16_out else torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.bf16_out:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight).float()
        return out if self.bias is None else out.add_(self.bias)


def set_vision_precision(model: nn.Module, precision: str) -> int:
    """Convert the linear layers of the model's vision modules (its VISION_MODULES) to
    `precision`, in place; returns how many were converted (0 for fp32 or a text model)."""
    if precision not in VISION_PRECISIONS:
        raise ValueError(f"vision precision must be one of {', '.join(VISION_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return 0
    converted = 0
    for prefix in getattr(model, "VISION_MODULES", ()):
        tower = model.get_submodule(prefix)
        for name, module in list(tower.named_modules()):
            if name and type(module) is nn.Linear and module.weight.dtype == torch.float32:
                parent, _, attribute = name.rpartition(".")
                setattr(tower.get_submodule(parent) if parent else tower, attribute,
                        Bf16Linear(module, bf16_out=attribute in _FEEDS_A_PRODUCT))
                converted += 1
    return converted


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor | None:
    """Unmasked attention of [images, patches, heads * 64] bf16 q, k, v on the CPU through the
    native AVX512-BF16 kernel (kernels/vision_attention.cpp), in the same layout out; None
    where it does not apply (another dtype, device or head size, no such CPU): the caller
    then runs PyTorch's attention."""
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.shape[-1] != heads * 64:
        return None
    kernels = native_kernels()
    if kernels is None or not kernels.vision_attention_supported():
        return None
    return kernels.vision_attention_bf16(q, k, v, heads, scale)
