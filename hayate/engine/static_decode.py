"""Decode steps of fixed shapes, captured once and replayed: the CUDA-graph path.

A step of n one-token sequences runs in the smallest bucket of B >= n sequences and W >= its
longest context (keys). The step's inputs (token ids, positions, block tables) are copied into
the bucket's buffers, and the step derives the cache rows, the new tokens' slots and the
padding mask from them on the device, so one capture serves every step of the bucket.
Padding sequences write to and read only a scratch block of the cache that no request owns.

On CUDA each bucket is a CUDA graph, captured when the engine starts (before a server reports
healthy, so no request pays for it); elsewhere the same fixed-shape step runs eagerly, which is
how the CPU tests hold everything but the capture to the dynamic eager step."""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from hayate.engine.kv_cache import KVCache
from hayate.layers.attention import AttentionMetadata

log = logging.getLogger("hayate.engine")
MIN_WIDTH = 256   # the narrowest key-width bucket (tokens): below it, padding costs little


def buckets(limit: int, start: int, multiple: int = 1) -> list[int]:
    """start, 2 * start, 4 * start ... below limit, then limit itself; each rounded up to
    `multiple`."""
    round_up = lambda n: -(-n // multiple) * multiple   # noqa: E731
    sizes, size = [], min(round_up(start), round_up(limit))
    while size < limit:
        sizes.append(size)
        size = round_up(size * 2)
    return sizes + [round_up(limit)]


class StaticStep:
    """One bucket: B sequences of at most W keys. Its buffers, and on CUDA its graph."""

    def __init__(self, model: nn.Module, batch: int, width: int, block_size: int, scratch_block: int,
                 device: torch.device):
        self.model, self.batch, self.width, self.scratch_block = model, batch, width, scratch_block
        blocks = width // block_size
        # [batch, 2 + blocks]: token id, position, then the block table padded with the scratch block
        pinned = device.type == "cuda"
        self.staging = torch.zeros(batch, 2 + blocks, dtype=torch.long, pin_memory=pinned)
        self.inputs = torch.zeros(batch, 2 + blocks, dtype=torch.long, device=device)
        self.columns = torch.arange(width, device=device)
        self.column_block, self.column_offset = self.columns // block_size, self.columns % block_size
        self.block_size = block_size
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._load([], [], [])

    def forward(self) -> torch.Tensor:
        """The fixed-shape step over the buffers: [batch, vocab] fp32 logits."""
        token_ids, positions, tables = self.inputs[:, 0], self.inputs[:, 1], self.inputs[:, 2:]
        rows = tables[:, self.column_block] * self.block_size + self.column_offset   # [batch, width]
        mask = (self.columns[None, :] <= positions[:, None])[:, None, None, :]      # [batch, 1, 1, width]
        slots = rows.gather(1, positions[:, None]).squeeze(1)                       # [batch]
        meta = AttentionMetadata([0] * self.batch, [1] * self.batch, slots, [], decode_only=True,
                                 padded_key_rows=rows, padding_mask=mask)
        return self.model.compute_logits(self.model(token_ids, positions, meta))

    def capture(self, pool) -> None:
        """Record the step as a CUDA graph (after two warm-up runs on a side stream, which
        create cuBLAS's handles and the allocator's blocks outside the capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self.forward()

    def run(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """[n, vocab] logits of the n sequences (n <= batch, every position < width)."""
        self._load(token_ids, positions, tables)
        if self.graph is None:
            return self.forward()[: len(token_ids)]
        self.graph.replay()
        return self.logits[: len(token_ids)]

    def _load(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> None:
        staging = self.staging.numpy()
        staging[:, :2] = 0
        staging[:, 2:] = self.scratch_block
        for row, (token, position, table) in enumerate(zip(token_ids, positions, tables)):
            used = position // self.block_size + 1
            staging[row, 0], staging[row, 1] = token, position
            staging[row, 2:2 + used] = table[:used]
        self.inputs.copy_(self.staging)


class StaticDecode:
    """Every bucket of a model's decode steps: batch sizes 1, 2, 4 ... max_batch, key widths
    MIN_WIDTH, 2 * MIN_WIDTH ... max_len. `capture` (CUDA only) records each as a graph."""

    def __init__(self, model: nn.Module, kv_cache: KVCache, scratch_block: int, max_batch: int, max_len: int,
                 capture: bool, min_width: int | None = None):
        device = kv_cache.storage.device
        size = kv_cache.block_size
        self.steps = {(batch, width): StaticStep(model, batch, width, size, scratch_block, device)
                      for batch in buckets(max_batch, 1) for width in buckets(max_len, min_width or MIN_WIDTH, size)}
        self.max_batch, self.max_len = max_batch, max(width for _, width in self.steps)
        if capture:
            start = time.perf_counter()
            pool = torch.cuda.graph_pool_handle()
            for key in sorted(self.steps, reverse=True):   # the largest first: the rest reuse its memory
                self.steps[key].capture(pool)
            log.info("captured %d decode graphs (up to %d sequences, %d tokens) in %.1f s",
                     len(self.steps), max_batch, self.max_len, time.perf_counter() - start)

    def fits(self, num_sequences: int, longest: int) -> bool:
        return num_sequences <= self.max_batch and longest <= self.max_len

    def run(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [sequences, vocab] for one new token per sequence, at `positions`."""
        longest = max(positions) + 1
        batch, width = min(key for key in self.steps if key[0] >= len(token_ids) and key[1] >= longest)
        return self.steps[batch, width].run(token_ids, positions, tables)
