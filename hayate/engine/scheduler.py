"""Which requests run in the next step, and how many tokens each (no torch here).

Policy: every running request that has finished its prompt decodes one token; the
remaining token budget goes to prompt chunks, oldest request first, so a long prompt is
prefilled in chunks while running streams keep flowing. A waiting request starts only
when a KV slot is free."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol


class Schedulable(Protocol):
    request_id: str
    slot: int | None
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...          # prompt + generated tokens so far

    @property
    def is_prefilling(self) -> bool: ...


@dataclass
class ScheduledSequence:
    request: Schedulable
    start: int        # tokens already in the KV cache
    num_tokens: int   # tokens to run now


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence]

    @property
    def is_empty(self) -> bool:
        return not self.sequences


class Scheduler:
    def __init__(self, num_slots: int, token_budget: int):
        self.free_slots = deque(range(num_slots))
        self.token_budget = token_budget
        self.waiting: deque[Schedulable] = deque()
        self.running: list[Schedulable] = []

    def add(self, request: Schedulable) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self._admit_waiting()
        decoding = [r for r in self.running if not r.is_prefilling]
        scheduled = [ScheduledSequence(r, r.num_computed_tokens, 1) for r in decoding]
        budget = max(self.token_budget - len(scheduled), 1)
        for request in self.running:
            if budget <= 0 or not request.is_prefilling:
                continue
            chunk = min(budget, request.num_tokens - request.num_computed_tokens)
            scheduled.append(ScheduledSequence(request, request.num_computed_tokens, chunk))
            budget -= chunk
        return SchedulerOutput(scheduled)

    def _admit_waiting(self) -> None:
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = self.free_slots.popleft()
            self.running.append(request)

    def finish(self, request: Schedulable) -> None:
        """Release the request's slot (its KV space) at once; safe to call twice."""
        if request in self.running:
            self.running.remove(request)
            self.free_slots.append(request.slot)
            request.slot = None
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)
