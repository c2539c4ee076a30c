"""Scheduler and block bookkeeping, on plain records (this layer does not use torch)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from hayate.engine.block_manager import BlockManager
from hayate.engine.scheduler import Scheduler


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    num_tokens: int
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    tokens: list[int] | None = None     # set: the request's token ids, and prefix caching on
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def cache_prefix(self) -> bool:
        return self.tokens is not None

    def token_ids(self, start: int, count: int) -> list[int]:
        self.tokens += [len(self.tokens)] * (self.num_tokens - len(self.tokens))   # "generated" tokens
        return self.tokens[start:start + count]


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, then pretend the model ran: every sequence that finished its tokens gets one
    more; full blocks are registered as the engine does."""
    out = scheduler.schedule()
    for seq in out.sequences:
        seq.request.num_computed_tokens += seq.num_tokens
        if seq.request.cache_prefix:
            scheduler.blocks.register(seq.request, seq.request.num_computed_tokens)
        if seq.request.num_computed_tokens == seq.request.num_tokens:
            seq.request.num_tokens += 1
    return {seq.request.request_id: seq.num_tokens for seq in out.sequences}


def cached_request(request_id: str, tokens: list[int]) -> FakeRequest:
    return FakeRequest(request_id, len(tokens), tokens=list(tokens))


def test_a_shared_prefix_is_computed_once():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=4, token_budget=64)
    prompt = list(range(100, 140))                          # 40 tokens: 10 blocks
    first = cached_request("a", prompt)
    assert run_step(scheduler) == {} and scheduler.add(first) is None
    assert run_step(scheduler) == {"a": 40}
    second = cached_request("b", prompt)
    scheduler.add(second)
    # 9 blocks shared: the last token is always computed, into a block of b's own
    assert run_step(scheduler) == {"a": 1, "b": 4}
    assert second.num_cached_tokens == 36 and second.block_table[:9] == first.block_table[:9]
    assert (scheduler.blocks.hit_tokens, scheduler.blocks.queried_tokens) == (36, 80)
    assert second.block_table[9] != first.block_table[9]
    assert all(scheduler.blocks.refs[block] == 2 for block in first.block_table[:9])
    scheduler.finish(first)
    assert all(scheduler.blocks.refs[block] == 1 for block in second.block_table[:9])
    # a prompt that diverges in its fourth block shares three
    third = cached_request("c", prompt[:13] + [7] + prompt[14:])
    scheduler.add(third)
    run_step(scheduler)
    assert third.num_cached_tokens == 12 and third.block_table[:3] == second.block_table[:3]


def test_a_block_is_keyed_by_everything_before_it():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=4, token_budget=64)
    tail = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    scheduler.add(cached_request("a", [1, 2, 3, 4] + tail))
    run_step(scheduler)
    other = cached_request("b", [4, 3, 2, 1] + tail)   # same later blocks, another first block
    scheduler.add(other)
    run_step(scheduler)
    assert other.num_cached_tokens == 0


def test_freed_blocks_keep_their_prefix_until_the_pool_reuses_them():
    blocks = BlockManager(8, 4)
    scheduler = Scheduler(blocks, max_num_seqs=1, token_budget=64)
    prompt = list(range(9))                                  # 3 blocks, 2 of them full
    first = cached_request("a", prompt)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.finish(first)
    assert blocks.num_free_blocks == 8 and blocks.usage == 0
    again = cached_request("b", prompt)
    scheduler.add(again)
    run_step(scheduler)
    assert again.num_cached_tokens == 8                       # reused while free
    scheduler.finish(again)
    filler = cached_request("c", list(range(50, 82)))        # 8 blocks: the whole pool
    scheduler.add(filler)
    run_step(scheduler)
    scheduler.finish(filler)
    late = cached_request("d", prompt)
    scheduler.add(late)
    run_step(scheduler)
    assert late.num_cached_tokens == 0                        # evicted by the filler


def test_a_request_that_cannot_start_holds_no_shared_blocks():
    blocks = BlockManager(5, 4)
    scheduler = Scheduler(blocks, max_num_seqs=2, token_budget=64)
    prompt = list(range(17))                                 # 5 blocks: the whole pool
    scheduler.add(cached_request("a", prompt))
    run_step(scheduler)
    waiting = cached_request("b", prompt + list(range(40, 60)))   # shares 4, and no block is free
    scheduler.add(waiting)
    assert run_step(scheduler) == {"a": 1}
    assert waiting in scheduler.waiting and waiting.block_table == [] and waiting.num_computed_tokens == 0
    assert all(refs == 1 for refs in blocks.refs)


def test_no_sharing_without_prefix_caching():
    scheduler = Scheduler(BlockManager(64, 4, prefix_caching=False), max_num_seqs=2, token_budget=64)
    for name in "ab":
        scheduler.add(cached_request(name, list(range(20))))
        run_step(scheduler)
    assert scheduler.running[1].num_cached_tokens == 0


def test_decodes_first_then_prompt_chunks_within_budget():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=4, token_budget=8)
    scheduler.add(FakeRequest("a", 3))
    assert run_step(scheduler) == {"a": 3}
    scheduler.add(FakeRequest("long", 30))
    assert run_step(scheduler) == {"a": 1, "long": 7}   # the decode is never starved
    assert run_step(scheduler) == {"a": 1, "long": 7}


def test_while_streams_decode_a_step_stays_one_planned_step():
    """With step_tokens set, a newcomer's prompt is fed alongside running decodes in pieces
    that keep each step at step_tokens (at least half of them prompt); alone, it gets the
    whole budget."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=20, token_budget=100, step_tokens=16)
    scheduler.add(FakeRequest("a", 40))
    assert run_step(scheduler) == {"a": 40}      # nothing decoding: the whole prompt at once
    for name in "bc":
        scheduler.add(FakeRequest(name, 20))
    assert run_step(scheduler) == {"a": 1, "b": 15}
    assert run_step(scheduler) == {"a": 1, "b": 5, "c": 10}
    assert run_step(scheduler) == {"a": 1, "b": 1, "c": 10}


def test_a_prompts_first_planned_prefix_tokens_are_a_chunk_of_their_own():
    scheduler = Scheduler(BlockManager(256, 4), max_num_seqs=4, token_budget=100, planned_prefix=24)
    scheduler.add(FakeRequest("long", 150))
    assert [run_step(scheduler) for _ in range(3)] == [{"long": 24}, {"long": 100}, {"long": 26}]
    scheduler.add(FakeRequest("short", 10))
    assert run_step(scheduler) == {"long": 1, "short": 10}


def test_many_decoding_streams_still_leave_a_newcomer_half_a_step():
    scheduler = Scheduler(BlockManager(256, 4), max_num_seqs=30, token_budget=100, step_tokens=16)
    for index in range(20):
        scheduler.add(FakeRequest(f"s{index}", 1))
    run_step(scheduler)                          # 20 one-token prompts: all decoding now
    scheduler.add(FakeRequest("new", 30))
    step = run_step(scheduler)
    assert len(step) == 21 and step["new"] == 8

def test_max_num_seqs_limits_admission():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, token_budget=100)
    for name in "abc":
        scheduler.add(FakeRequest(name, 2))
    assert set(run_step(scheduler)) == {"a", "b"}
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_preempts_newest_when_blocks_run_out_and_finish_frees_everything():
    blocks = BlockManager(4, 2)   # 8 tokens in all
    scheduler = Scheduler(blocks, max_num_seqs=2, token_budget=100)
    old, new = FakeRequest("old", 4), FakeRequest("new", 4)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)           # both prefilled: 2 blocks each, pool empty
    assert blocks.num_free_blocks == 0
    out = scheduler.schedule()    # old needs a third block for token 5: new is preempted
    assert out.preempted == [new] and new.num_computed_tokens == 0 and not new.block_table
    assert [s.request for s in out.sequences] == [old]
    scheduler.finish(old)
    scheduler.finish(new)
    assert blocks.num_free_blocks == 4 and not scheduler.has_unfinished()


def test_prefill_waits_when_no_block_is_free():
    blocks = BlockManager(2, 4)
    scheduler = Scheduler(blocks, max_num_seqs=4, token_budget=100)
    scheduler.add(FakeRequest("a", 8))
    scheduler.add(FakeRequest("b", 4))
    assert run_step(scheduler) == {"a": 8}
    assert [r.request_id for r in scheduler.waiting] == ["b"]


def test_scheduler_does_not_import_torch():
    code = "import sys, hayate.engine.scheduler; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
