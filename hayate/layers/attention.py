"""Causal attention over a preallocated KV cache, for a flat batch of sequences."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Where each sequence of a step lives: tokens are flat, sequence after sequence."""
    slot_ids: list[int]        # KV-cache row of each sequence
    context_lens: list[int]    # tokens already cached for each sequence before this step
    query_lens: list[int]      # new tokens of each sequence in this step

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self) -> torch.Tensor:
        """[tokens] absolute position of every new token."""
        return torch.cat([torch.arange(start, start + n)
                          for start, n in zip(self.context_lens, self.query_lens)])

    def last_token_indices(self) -> torch.Tensor:
        """[sequences] index of each sequence's last new token in the flat batch."""
        return torch.tensor(self.query_lens).cumsum(0) - 1


class Attention(nn.Module):
    """Writes this step's keys/values into the cache, then attends each query to its prefix.
    The cache views (k_cache, v_cache: [slots, max_len, kv_heads, head_dim]) are bound by
    the KV cache at allocation time."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [tokens, heads, head_dim], k/v [tokens, kv_heads, head_dim] -> [tokens, heads * head_dim]."""
        if self.k_cache is None:
            raise RuntimeError("attention used before a KV cache was bound to the model")
        outputs, offset = [], 0
        for slot, start, length in zip(meta.slot_ids, meta.context_lens, meta.query_lens):
            end = start + length
            self.k_cache[slot, start:end] = k[offset:offset + length]
            self.v_cache[slot, start:end] = v[offset:offset + length]
            outputs.append(self._attend(q[offset:offset + length], slot, start, end))
            offset += length
        return torch.cat(outputs).reshape(q.shape[0], self.num_heads * self.head_dim)

    def _attend(self, q: torch.Tensor, slot: int, start: int, end: int) -> torch.Tensor:
        keys = self.k_cache[slot, :end].transpose(0, 1)      # [kv_heads, end, head_dim]
        values = self.v_cache[slot, :end].transpose(0, 1)
        query = q.transpose(0, 1)                            # [heads, length, head_dim]
        mask = None
        if query.shape[1] > 1 and start > 0:
            # Query i sits at position start + i and sees keys 0 .. start + i.
            key_pos = torch.arange(end, device=q.device)
            query_pos = torch.arange(start, end, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=self.scale,
            is_causal=mask is None and query.shape[1] > 1, enable_gqa=True)
        return out.transpose(0, 1)                           # [length, heads, head_dim]
