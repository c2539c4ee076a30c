"""The pre-norm transformer encoder layer that SigLIP and CLIP share (same shapes, same
names), with its bidirectional attention and its settings."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from hayate.models.vision.precision import bf16_attention


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, hf: dict[str, Any], defaults: dict[str, Any]) -> "VisionConfig":
        """From a config.json's vision_config; missing keys take the family's defaults."""
        settings = {**defaults, **{key: value for key, value in hf.items() if key in defaults}}
        config = cls(**settings)
        activation(config.hidden_act)   # an unknown activation fails here, at build time
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"vision hidden_size {config.hidden_size} is not a multiple of "
                             f"{config.num_attention_heads} heads")
        return config

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": _quick_gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function transformers' ACT2FN names `name` (the ones vision towers use)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported (supported: "
                         f"{', '.join(sorted(_ACTIVATIONS))})") from None


class VisionAttention(nn.Module):
    """Every patch attends to every (unpadded) patch of its own image: no cache, no causality."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden = config.hidden_size
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.num_heads = config.num_attention_heads
        self.scale = 1 / math.sqrt(hidden // self.num_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [images, patches, hidden], mask [images, 1, 1, patches] bool (True: attend) or None."""
        images, patches, hidden = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if mask is None:   # the bf16 encoder's native kernel (precision.py), where it applies
            out = bf16_attention(q, k, v, self.num_heads, self.scale)
            if out is not None:
                return self.out_proj(out)
        q, k, v = (t.view(images, patches, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(images, patches, hidden))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x
