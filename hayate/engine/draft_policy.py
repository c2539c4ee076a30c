"""How many tokens a sequence drafts this step (speculative.py): the number that maximises
the step's expected tokens per second, from the sequence's measured acceptance and what a
step of that many more rows costs here (no torch).

A drafted token is worth its chance of acceptance; its row is not free. On a GPU, or a CPU
while the weights' bytes bound the step, rows are nearly free; on these CPUs the planned
step is bound by the VNNI kernel's arithmetic past two rows (docs/PERFORMANCE.md), and the
default model's step of 2, 4, 8 and 16 rows, the engine's own per-step work included, takes
1.5-1.65x, ~2x, ~3.2x and 5.5-6.5x a one-row step's time: long drafts pay only when nearly
all of them are accepted, and a large batch leaves no room for any. The costs are measured
once, on the planned step itself (StepCosts.of_plan), or assumed where there is no plan."""
from __future__ import annotations

import time
from typing import Callable

from hayate.engine.block_manager import BlockManager

MARGIN = 1.05          # a draft must promise this much more throughput than none
ASSUMED_ROW_COST = {"cuda": 0.05, "cpu": 0.5}   # of a one-row step, per further row, with no plan to time
# The engine's own work a step, around the forward pass the plan times (scheduling, sampling,
# detokenizing; docs/PERFORMANCE.md's fixed per-step cost, ~0.5 ms with the plan's dispatch)
STEP_OVERHEAD = 0.4e-3
MEASURED_ROWS = (1, 2, 3, 4, 6, 8, 12)   # and the plan's most


class StepCosts:
    """Seconds of a step by its number of rows (1 .. len(seconds)), measured or assumed."""

    def __init__(self, seconds: list[float]):
        self.seconds = seconds

    @classmethod
    def measure(cls, run_rows: Callable[[int], None], max_rows: int, repeats: int = 5,
                overhead: float = 0.0) -> "StepCosts":
        """Time run_rows(r) (one step of r rows) at MEASURED_ROWS up to max_rows, in rounds
        (a slow phase of the machine touches every size), each size's fastest run plus
        `overhead`; sizes between are interpolated."""
        sizes = [rows for rows in MEASURED_ROWS if rows < max_rows] + [max_rows]
        fastest = dict.fromkeys(sizes, float("inf"))
        for rows in sizes:   # once unmeasured: buffers sized, pages touched
            run_rows(rows)
        for _ in range(repeats):
            for rows in sizes:
                began = time.perf_counter()
                run_rows(rows)
                fastest[rows] = min(fastest[rows], time.perf_counter() - began)
        seconds = [fastest[rows] + overhead for rows in sizes]
        return cls(_interpolated(sizes, _non_decreasing(seconds)))

    @classmethod
    def of_plan(cls, plan, blocks: BlockManager) -> "StepCosts | None":
        """The planned step's costs up to plan.max_batch rows (one sequence's consecutive
        positions, logits for every row, as a drafted step has them), in blocks borrowed from
        the pool for the measurement; None if the pool has too few free."""
        table: list[int] = []
        rows = plan.max_batch
        if not blocks.grow(table, rows):
            return None
        try:
            return cls.measure(lambda n: plan.run([0] * n, list(range(n)), [table] * n, list(range(n))), rows,
                               overhead=STEP_OVERHEAD)
        finally:
            blocks.release(table)

    @classmethod
    def assumed(cls, max_rows: int, per_row: float) -> "StepCosts":
        """Each row past the first costs `per_row` of a one-row step."""
        return cls([1.0 + per_row * rows for rows in range(max_rows)])

    def of(self, rows: int) -> float:
        """A step of `rows` rows; past the table, each further row costs the last one's increase."""
        table = self.seconds
        if rows <= len(table):
            return table[rows - 1]
        last = table[-1] - table[-2] if len(table) > 1 else table[-1]
        return table[-1] + (rows - len(table)) * last

    def best_draft(self, rate: float, max_tokens: int, decodes: int, rows: int, per_token: float = 0.0,
                   setup: float = 0.0, remaining: int = 1) -> int:
        """Draft length (0: none) for a sequence whose drafted tokens are each accepted with
        probability `rate` (while the ones before were), in a step of `rows` rows so far that
        gives `decodes` tokens, each drafted token costing `per_token` seconds to draft (a
        draft model's step; prompt lookup's are free) after `setup` seconds of catching up
        (a draft model's run over the tokens it has not seen), shared by the steps left in
        the sequence's `remaining` tokens: the length that maximises expected tokens per second."""
        best, best_value, expected, accept = 0, decodes / self.of(rows) * MARGIN, 0.0, 1.0
        for length in range(1, max_tokens + 1):
            accept *= rate
            expected += accept
            setup_share = setup * (1 + expected) / max(remaining, 1)
            value = (decodes + expected) / (self.of(rows + length) + per_token * length + setup_share)
            if value > best_value:
                best, best_value = length, value
        return best


class Acceptance:
    """A sequence's chance that a drafted token is accepted (given the ones before it were),
    from its recent drafts: counts that fade by DECAY every decode step towards its prior.
    Prompt lookup's (PRIOR) is hopeful but light: drafting starts at once, one rejection stops
    it where rows are dear, and a sequence that stopped tries again rarely (where every draft
    fails, after ~150 decode steps, then ~400, on this CPU's costs)."""
    PRIOR = (0.8, 0.2)     # pseudo-counts (accepted, rejected): a rate of 0.8 to start
    DECAY = 0.998

    def __init__(self, prior: tuple[float, float] = PRIOR):
        self.prior = prior
        self.accepted, self.rejected = prior

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def step(self) -> None:
        """A decode step passed: older evidence counts a little less."""
        prior_accepted, prior_rejected = self.prior
        self.accepted = prior_accepted + (self.accepted - prior_accepted) * self.DECAY
        self.rejected = prior_rejected + (self.rejected - prior_rejected) * self.DECAY

    def record(self, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` tokens accepted: that many successes, and one failure if
        the run ended on a rejection."""
        self.accepted += accepted
        self.rejected += 1 if accepted < drafted else 0


def _interpolated(sizes: list[int], seconds: list[float]) -> list[float]:
    """Seconds for every size 1 .. sizes[-1], linear between the measured ones."""
    table = []
    for (low, low_seconds), (high, high_seconds) in zip(zip(sizes, seconds), zip(sizes[1:], seconds[1:])):
        table += [low_seconds + (high_seconds - low_seconds) * (rows - low) / (high - low) for rows in range(low, high)]
    return table + [seconds[-1]]


def _non_decreasing(seconds: list[float]) -> list[float]:
    """Measurements made monotone (a step of more rows never costs less): noise aside."""
    for index in range(1, len(seconds)):
        seconds[index] = max(seconds[index], seconds[index - 1])
    return seconds
