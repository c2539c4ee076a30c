"""Which requests run in the next step, and how many tokens each (no torch here).

Policy: every running request with one token pending decodes it; the rest of the step's
token budget goes to prompt chunks, oldest request first, so a long prompt is prefilled in
chunks while running streams keep flowing; a newcomer first shares the cached blocks its
prompt starts with (block_manager.py), and only the rest is prefilled. While streams
decode, a step holds at most `step_tokens` tokens (one planned step's rows) when that is
set: a newcomer's prompt then costs each running stream about one decode step, not a whole
prompt's prefill. A prompt's first `planned_prefix` tokens (the plan's max_tokens) go in a
chunk of their own, which runs planned (model_runner.py). KV blocks are taken as sequences
grow; when a decode finds the pool empty, the newest running request is preempted (its
blocks freed, its tokens recomputed later).

Speculative decoding (speculative.py): with a drafter, each decoding request may get drafted
tokens to verify in the rows a step has left after decodes and prompt chunks, shared evenly,
and in free blocks only: drafts never preempt or delay anyone. Blocks taken for drafts the
model rejected are kept for the tokens to come (giving them back at once would churn the
free pool and evict cached prefixes), or given back when a decode or a prompt chunk finds
the pool short."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from hayate.engine.block_manager import BlockManager


class Schedulable(Protocol):
    request_id: str
    block_table: list[int]
    block_hashes: list[int]
    num_computed_tokens: int
    num_cached_tokens: int                    # of the prompt, found in the prefix cache
    cache_prefix: bool                        # may share and register cached blocks

    @property
    def num_tokens(self) -> int: ...          # prompt + generated tokens so far

    def token_ids(self, start: int, count: int) -> list[int]: ...


@dataclass
class ScheduledSequence:
    request: Schedulable
    start: int        # tokens already in the KV cache
    num_tokens: int   # tokens to run now (drafted ones included)
    draft_token_ids: list[int] = field(default_factory=list)   # after the sequence's last token, to verify

    def token_ids(self) -> list[int]:
        """The step's tokens for this sequence: its own, then its drafts."""
        if not self.draft_token_ids:
            return self.request.token_ids(self.start, self.num_tokens)
        return self.request.token_ids(self.start, self.num_tokens - len(self.draft_token_ids)) + self.draft_token_ids


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence]
    preempted: list[Schedulable]

    @property
    def is_empty(self) -> bool:
        return not self.sequences

    @property
    def has_drafts(self) -> bool:
        return any(scheduled.draft_token_ids for scheduled in self.sequences)


# (a decoding request, most tokens, decodes in the step, rows in it so far) -> drafted tokens
Drafter = Callable[[Schedulable, int, int, int], list[int]]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, token_budget: int, step_tokens: int = 0,
                 planned_prefix: int = 0):
        self.blocks = blocks
        self.max_num_seqs, self.token_budget, self.step_tokens = max_num_seqs, token_budget, step_tokens
        self.planned_prefix = planned_prefix
        self.drafter: Drafter | None = None   # speculative decoding: set by the engine's first speculative request
        self.waiting: deque[Schedulable] = deque()
        self.running: list[Schedulable] = []
        self.num_preemptions = 0

    def add(self, request: Schedulable) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks.usage

    def schedule(self) -> SchedulerOutput:
        preempted = self._reserve_decodes()
        scheduled = [ScheduledSequence(r, r.num_computed_tokens, 1) for r in self.running if _pending(r) == 1]
        num_decodes = len(scheduled)
        budget = max(self.token_budget - len(scheduled), 1)
        if scheduled and self.step_tokens:   # streams are decoding: keep their step short
            budget = min(budget, max(self.step_tokens - len(scheduled), self.step_tokens // 2))
        for request in self.running:
            if budget > 0 and _pending(request) > 1:
                chunk = self._chunk(request, budget)
                if chunk:
                    scheduled.append(ScheduledSequence(request, request.num_computed_tokens, chunk))
                    budget -= chunk
        # After a preemption memory is short: admitting now would only thrash.
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            if request.cache_prefix and not request.block_table:
                request.num_computed_tokens = request.num_cached_tokens = self.blocks.reuse_prefix(request)
            chunk = self._chunk(request, budget)
            if not chunk:   # no room yet: hold no blocks while waiting
                self.blocks.release(request.block_table)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if request.cache_prefix:
                self.blocks.count_reuse(request.num_tokens, request.num_cached_tokens)
            self.running.append(request)
            scheduled.append(ScheduledSequence(request, request.num_computed_tokens, chunk))
            budget -= chunk
        if self.drafter is not None and num_decodes:
            self._add_drafts(scheduled, num_decodes)
        return SchedulerOutput(scheduled, preempted)

    def _add_drafts(self, scheduled: list[ScheduledSequence], num_decodes: int) -> None:
        """Drafted tokens for the decodes (the first num_decodes), in the step's spare rows
        (shared evenly, a share a request leaves going to the next) and free blocks."""
        rows = sum(s.num_tokens for s in scheduled)
        spare = (self.step_tokens or self.token_budget) - rows
        for position, decode in enumerate(scheduled[:num_decodes]):
            request = decode.request
            free = (len(request.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
            room = min(spare // (num_decodes - position), free - request.num_tokens)
            draft = self.drafter(request, room, num_decodes, rows) if room > 0 else []
            if draft:
                self.blocks.grow(request.block_table, request.num_tokens + len(draft))
                decode.draft_token_ids = draft
                decode.num_tokens += len(draft)
                rows, spare = rows + len(draft), spare - len(draft)

    def _reserve_decodes(self) -> list[Schedulable]:
        """Make room for every decoding request's next token, preempting the newest."""
        preempted = []
        for request in list(self.running):
            if request not in self.running or _pending(request) != 1:
                continue
            while not self.blocks.grow(request.block_table, request.num_tokens):
                if self.drafter is not None and self._free_draft_blocks():
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
        return preempted

    def _free_draft_blocks(self) -> bool:
        """Give back blocks that running requests took for drafts beyond their tokens; whether any."""
        return sum(self.blocks.trim(request.block_table, request.num_tokens) for request in self.running) > 0

    def _chunk(self, request: Schedulable, budget: int) -> int:
        """Tokens of this prefill that fit the budget and the free blocks (0 if none)."""
        if request.num_computed_tokens < self.planned_prefix:
            budget = min(budget, self.planned_prefix - request.num_computed_tokens)
        chunk = min(budget, _pending(request))
        free_tokens = (len(request.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
        if chunk > free_tokens - request.num_computed_tokens and self.drafter is not None and self._free_draft_blocks():
            return self._chunk(request, budget)
        chunk = min(chunk, free_tokens - request.num_computed_tokens)
        if chunk <= 0:
            return 0
        self.blocks.grow(request.block_table, request.num_computed_tokens + chunk)
        return chunk

    def _preempt(self, request: Schedulable) -> None:
        self.num_preemptions += 1
        self.running.remove(request)
        self.blocks.release(request.block_table)
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)

    def finish(self, request: Schedulable) -> None:
        """Free the request's KV blocks at once; safe to call twice."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.release(request.block_table)


def _pending(request: Schedulable) -> int:
    return request.num_tokens - request.num_computed_tokens
