"""PackedLinear: a linear layer that keeps its weight in GGUF form to save memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayate.layers.quant import PackedWeight, QType, dequantize


class PackedLinear(nn.Module):
    """A linear layer whose weight stays in its GGUF packed form and is dequantized per forward."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.ggml_type = int(weight.ggml_type)
        # A buffer, so .to(device) moves it and state_dict() holds it.
        self.register_buffer("packed", weight.data)
        # The bias stays a parameter, as in nn.Linear, so loaders can find and fill it.
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)

    @property
    def weight(self) -> PackedWeight:
        return PackedWeight(self.packed, self.ggml_type, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in_features] -> [..., out_features]
        weight = dequantize(self.packed, self.ggml_type, (self.out_features, self.in_features))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        type_name = QType(self.ggml_type).name
        return f"in_features={self.in_features}, out_features={self.out_features}, type={type_name}"
