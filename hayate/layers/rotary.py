"""Rotary position embeddings (NeoX half-split layout, as Hugging Face models use), with
the Llama 3 and linear frequency scalings."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hayate.kernels import kernels_for_rows

MAX_POSITIONS = 2 ** 24   # a context longer than this is a corrupt setting, not a model's


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, scaled as the config asks."""
    arange = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (theta ** (arange.float() / head_dim))
    kind = (scaling or {}).get("rope_type")
    if kind is None:
        return inv_freq
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    if kind == "linear":
        return inv_freq / _scaling_value(scaling, "factor")
    raise ValueError(f"RoPE scaling type {kind!r} is not supported (supported: llama3, linear)")


def _scaling_value(scaling: dict[str, Any], key: str) -> float:
    value = scaling.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{scaling.get('rope_type')} RoPE scaling needs {key} as a positive number, got {value!r}")
    return float(value)


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = _scaling_value(scaling, "factor")
    low, high = _scaling_value(scaling, "low_freq_factor"), _scaling_value(scaling, "high_freq_factor")
    old_context = _scaling_value(scaling, "original_max_position_embeddings")
    if low >= high:
        raise ValueError(f"llama3 RoPE scaling needs low_freq_factor < high_freq_factor, got {low} and {high}")
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    # Between the two wavelengths, interpolate smoothly between scaled and unscaled.
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin for every position up to max_positions once, at build time."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        if head_dim <= 0 or head_dim % 2 or not 0 < max_positions <= MAX_POSITIONS:
            raise ValueError(f"rotary embeddings need an even head size and 1 to {MAX_POSITIONS} positions, "
                             f"got head size {head_dim} and {max_positions} positions")
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        # Built on the CPU even while the rest of the model is built on the meta device.
        freqs = torch.arange(max_positions, dtype=torch.float32, device="cpu")[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # [positions, head_dim]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [tokens, 1, head_dim] for these positions: looked up once per step and
        shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(tables: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
    """q [tokens, heads, head_dim], k [tokens, kv_heads, head_dim] -> rotated q, k (for a
    decode step's few contiguous rows, rotated in place by the native kernel)."""
    kernels = kernels_for_rows(q, q.shape[0])
    if kernels is not None and q.is_contiguous() and k.is_contiguous():
        cos, sin = (t.squeeze(1) for t in tables)
        kernels.rope_(q, cos, sin)
        kernels.rope_(k, cos, sin)
        return q, k
    cos, sin = (t.to(q.dtype) for t in tables)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
