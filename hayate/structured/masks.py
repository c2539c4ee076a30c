"""One step's grammar masks: filled for the constrained rows on a worker thread while the
forward pass runs (llguidance releases the GIL, and so does the planned step), then applied
to those rows' logits before sampling. Where the forward pass already has a thread on every
usable CPU, the fill would only wait for a core, so it runs first, on the calling thread (a
schema's decode on 2 cores: 140 tokens/s so, 135 beside the forward pass). Unconstrained rows
are never touched, and a step without constrained rows costs one list comprehension.

Applying is one pass over a row in the native kernels (`mask_logits_`); elsewhere (CUDA, no
compiler) one vectorised PyTorch unpack of the batch's int32 bitmask."""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from hayate.kernels import native_kernels
from hayate.structured.backend import GrammarBackend, GrammarMatcher

FILL_TIMES_KEPT = 4096


@dataclass
class PendingMasks:
    """Masks being filled for `rows` (indices into the step's sampling rows); future None:
    already filled, inline."""
    future: Future | None
    rows: list[int]


class GrammarMasks:
    def __init__(self, backend: GrammarBackend, max_rows: int = 1, inline: bool | None = None):
        """inline: fill on the calling thread before the forward pass (None: where torch's
        threads take every CPU this process may use)."""
        self.backend = backend
        self.inline = torch.get_num_threads() >= len(os.sched_getaffinity(0)) if inline is None else inline
        self.words = (backend.vocab_size + 31) // 32
        self._allocate(max(max_rows, 1))
        # Looked up once (by the first CPU step: never built for CUDA logits). Right after a
        # forward pass has streamed the weights through the caches each Python call here costs
        # tens of us: a step's future, from_numpy and the kernels' lookup were ~100 us a step
        self.kernels = False   # not looked up yet (None: no native kernels here)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hayate-grammar")
        self.fill_times: deque[tuple[float, int]] = deque(maxlen=FILL_TIMES_KEPT)   # (seconds, rows) a step

    def start(self, constraints: list[GrammarMatcher | None]) -> PendingMasks | None:
        """Begin filling the masks of the rows that have a constraint; None if no row has."""
        rows = [(constraint, row) for row, constraint in enumerate(constraints) if constraint is not None]
        if not rows:
            return None
        if len(constraints) > self.bitmask.shape[0]:   # grows once, to the largest batch seen
            self._allocate(len(constraints))
        if self.inline:
            self._fill(rows, self.bitmask)
            return PendingMasks(None, [row for _, row in rows])
        return PendingMasks(self.pool.submit(self._fill, rows, self.bitmask), [row for _, row in rows])

    def apply(self, logits: torch.Tensor, pending: PendingMasks) -> None:
        """Wait for the masks, then set each constrained row's disallowed logits to -inf."""
        if pending.future is not None:
            pending.future.result()
        native = _native_ok(logits)
        if native and self.kernels is False:
            self.kernels = native_kernels()
        if native and self.kernels is not None:
            self.kernels.mask_logits_(logits, self.bitmask_tensor, pending.rows)
        else:
            apply_bitmask_torch(logits, self.bitmask_tensor, pending.rows)

    def _allocate(self, rows: int) -> None:
        self.bitmask = np.zeros((rows, self.words), dtype=np.int32)
        self.bitmask_tensor = torch.from_numpy(self.bitmask)   # the same memory

    def _fill(self, rows: list[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None:
        began = time.perf_counter()
        self.backend.fill_masks(rows, bitmask)
        self.fill_times.append((time.perf_counter() - began, len(rows)))


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """mask_logits_'s slow twin: unpack the rows' bits in one op, then one masked_fill."""
    vocab = logits.shape[1]
    index = torch.tensor(rows, device=logits.device)
    words = bitmask[rows].to(logits.device)                                # [rows, W] int32
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)      # [rows, W * 32]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    logits[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))


def _native_ok(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1)
