"""Causal attention over a paged KV cache, for a flat batch of sequences."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Where each sequence of a step lives: tokens are flat, sequence after sequence.
    The cache is addressed by row: row = block * block_size + offset."""
    context_lens: list[int]          # tokens already cached for each sequence before this step
    query_lens: list[int]            # new tokens of each sequence in this step
    slot_mapping: torch.Tensor       # [tokens] cache row to write each new token's key/value to
    key_rows: list[torch.Tensor]     # per sequence: [context + new] cache rows of its keys, in order
    decode_only: bool = False        # every sequence runs exactly one new token
    # Decode-only steps: the keys' rows padded to the longest sequence, and which are real;
    # or, for a lone sequence on consecutive blocks, the cache rows a..b themselves.
    padded_key_rows: torch.Tensor | None = None   # [sequences, longest]
    padding_mask: torch.Tensor | None = None      # [sequences, 1, 1, longest] bool
    key_range: tuple[int, int] | None = None
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)   # made by window_mask()

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
              block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        key_rows = [_rows(table, start + length, block_size, device)
                    for table, start, length in zip(block_tables, context_lens, query_lens)]
        slot_mapping = torch.cat([rows[start:] for rows, start in zip(key_rows, context_lens)])
        meta = cls(list(context_lens), list(query_lens), slot_mapping, key_rows,
                   decode_only=all(length == 1 for length in query_lens))
        if not meta.decode_only:
            return meta
        if len(key_rows) == 1 and _consecutive(block_tables[0], key_rows[0].shape[0], block_size):
            meta.key_range = (int(key_rows[0][0]), int(key_rows[0][-1]) + 1)
        else:
            lengths = torch.tensor([rows.shape[0] for rows in key_rows], device=device)
            longest = max(rows.shape[0] for rows in key_rows)
            meta.padding_mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
            # Padding reads row 0 of the cache; the mask gives it no weight.
            meta.padded_key_rows = torch.nn.utils.rnn.pad_sequence(key_rows, batch_first=True)
        return meta

    def window_mask(self, window: int) -> torch.Tensor:
        """padding_mask less the keys `window` or more places before each sequence's last
        (its query): computed on the device, once per step and window."""
        if window not in self.window_masks:
            lengths = self.padding_mask.sum(-1, keepdim=True)      # [sequences, 1, 1, 1]
            columns = torch.arange(self.padding_mask.shape[-1], device=lengths.device)
            self.window_masks[window] = self.padding_mask & (columns >= lengths - window)
        return self.window_masks[window]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self) -> torch.Tensor:
        """[tokens] absolute position of every new token."""
        return torch.cat([torch.arange(start, start + n, device=self.slot_mapping.device)
                          for start, n in zip(self.context_lens, self.query_lens)])

    def last_token_indices(self) -> torch.Tensor:
        """[sequences] index of each sequence's last new token in the flat batch."""
        return torch.tensor(self.query_lens, device=self.slot_mapping.device).cumsum(0) - 1


def _consecutive(block_table: list[int], num_tokens: int, block_size: int) -> bool:
    used = block_table[: -(-num_tokens // block_size)]
    return all(b == a + 1 for a, b in zip(used, used[1:]))


def _rows(block_table: list[int], num_tokens: int, block_size: int, device: torch.device | str) -> torch.Tensor:
    positions = torch.arange(num_tokens, device=device)
    return torch.tensor(block_table, dtype=torch.long, device=device)[positions // block_size] * block_size \
        + positions % block_size


class Attention(nn.Module):
    """Writes this step's keys/values into the cache, then attends each query to its prefix.
    The cache views (k_cache, v_cache: [rows, kv_heads, head_dim]) are bound by the KV
    cache at allocation time. A cache of another dtype than the activations' (a float16 /
    bfloat16 cache) stores keys/values rounded by torch's .to() and is read back widened:
    attention itself runs in the queries' dtype."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        # Sliding window: a query at position i sees keys i - window < j <= i (None: all).
        self.window = window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [tokens, heads, head_dim], k/v [tokens, kv_heads, head_dim] -> [tokens, heads * head_dim]."""
        if self.k_cache is None:
            raise RuntimeError("attention used before a KV cache was bound to the model")
        self.k_cache.index_copy_(0, meta.slot_mapping, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(0, meta.slot_mapping, v.to(self.v_cache.dtype))
        if meta.decode_only:
            return self._attend_decodes(q, meta)
        outputs, offset = [], 0
        attend = self._attend if self.window is None else self._attend_window
        for rows, start, length in zip(meta.key_rows, meta.context_lens, meta.query_lens):
            outputs.append(attend(q[offset:offset + length], rows, start))
            offset += length
        return torch.cat(outputs).reshape(q.shape[0], self.num_heads * self.head_dim)

    def _attend_decodes(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence: every sequence at once, keys padded to the longest."""
        batch = len(meta.query_lens)
        mask = meta.padding_mask
        if meta.key_range is not None:   # no gather: the cache rows themselves, as a view
            first, end = meta.key_range
            first = first if self.window is None else max(first, end - self.window)
            keys, values = self.k_cache[first:end], self.v_cache[first:end]
            width = end - first
        else:
            width = meta.padded_key_rows.shape[1]
            keys = self.k_cache.index_select(0, meta.padded_key_rows.reshape(-1))
            values = self.v_cache.index_select(0, meta.padded_key_rows.reshape(-1))
            mask = mask if self.window is None else meta.window_mask(self.window)
        # .to() is a no-op (still the view) for a cache of the queries' dtype
        keys = keys.view(batch, width, self.num_kv_heads, self.head_dim).transpose(1, 2).to(q.dtype)
        values = values.view(batch, width, self.num_kv_heads, self.head_dim).transpose(1, 2).to(q.dtype)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask,
                                             scale=self.scale, enable_gqa=True)
        return out.reshape(batch, self.num_heads * self.head_dim)  # [batch, heads, 1, head_dim] flat

    def _attend(self, q: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
        keys = self.k_cache.index_select(0, rows).to(q.dtype).transpose(0, 1)   # [kv_heads, end, head_dim]
        values = self.v_cache.index_select(0, rows).to(q.dtype).transpose(0, 1)
        query = q.transpose(0, 1)                                    # [heads, length, head_dim]
        mask = None
        if query.shape[1] > 1 and start > 0:
            # Query i sits at position start + i and sees keys 0 .. start + i.
            end = rows.shape[0]
            mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        # With a batch dimension (4-D) PyTorch's CPU flash kernel takes grouped heads; 3-D
        # inputs fall to its math path: 2-3x slower prefill attention, same values to fp32.
        out = F.scaled_dot_product_attention(
            query[None], keys[None], values[None], attn_mask=mask, scale=self.scale,
            is_causal=mask is None and query.shape[1] > 1, enable_gqa=True)[0]
        return out.transpose(0, 1)                                   # [length, heads, head_dim]

    def _attend_window(self, q: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
        """_attend for a sliding-window layer: only the keys some query of the chunk can see."""
        first = max(0, start - self.window + 1)
        keys = self.k_cache.index_select(0, rows[first:]).to(q.dtype).transpose(0, 1)
        values = self.v_cache.index_select(0, rows[first:]).to(q.dtype).transpose(0, 1)
        key_positions = torch.arange(first, rows.shape[0], device=q.device)[None, :]
        query_positions = torch.arange(start, rows.shape[0], device=q.device)[:, None]
        mask = (key_positions <= query_positions) & (key_positions > query_positions - self.window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                             scale=self.scale, enable_gqa=True)[0]
        return out.transpose(0, 1)                                   # [length, heads, head_dim]
