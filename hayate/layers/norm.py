"""RMSNorm, computed in fp32 as the reference implementations do."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayate.kernels import kernels_for_rows


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = kernels_for_rows(x, x.numel() // x.shape[-1])
        if kernels is not None:   # a decode step's few rows: a plain loop, ~8x faster
            return kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            # One fused op; bitwise the same as the formula below for fp32 input.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)
