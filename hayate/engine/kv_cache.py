"""The KV cache: one tensor allocated at start-up, in blocks; each attention layer gets a view.
Its dtype is the weights' by default, or float16 / bfloat16 by choice (EngineConfig.kv_cache_dtype):
half the bytes a token, keys and values rounded once as they are stored."""
from __future__ import annotations

import torch
from torch import nn

from hayate.layers.attention import Attention
from hayate.models.config import ModelConfig


def kv_cache_dtype(setting: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for EngineConfig.kv_cache_dtype: "auto" keeps the weights'."""
    return weight_dtype if setting == "auto" else getattr(torch, setting)


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        # [layers, k/v, rows (= blocks * block_size), kv_heads, head_dim]
        self.storage = torch.zeros(config.num_hidden_layers, 2, num_blocks * block_size,
                                   config.num_key_value_heads, config.head_dim,
                                   dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @property
    def element_size(self) -> int:
        """Bytes of one cached key or value element (the cost model's kv_bytes)."""
        return self.storage.element_size()

    def bind(self, model: nn.Module) -> None:
        """Give every attention layer of the model (in order) its views of the cache."""
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        if len(layers) != self.storage.shape[0]:
            raise ValueError(f"model has {len(layers)} attention layers, cache has {self.storage.shape[0]}")
        for index, attention in enumerate(layers):
            attention.k_cache, attention.v_cache = self.storage[index, 0], self.storage[index, 1]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
