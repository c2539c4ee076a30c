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


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, then pretend the model ran: every sequence that finished its tokens gets one more."""
    out = scheduler.schedule()
    for seq in out.sequences:
        seq.request.num_computed_tokens += seq.num_tokens
        if seq.request.num_computed_tokens == seq.request.num_tokens:
            seq.request.num_tokens += 1
    return {seq.request.request_id: seq.num_tokens for seq in out.sequences}


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
