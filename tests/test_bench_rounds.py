"""hayate bench's schedule and its peers' workers: engines take turns round by round in a
rotating order, a failing peer is dropped and reported while the others go on, and a peer's
worker (the real protocol of peer_worker.py, with a fake runner in place of llama.cpp) is
loaded once, answers request by request and reports crashes, garbage and timeouts in one
line. No real peers, no timing thresholds."""
from __future__ import annotations

import sys

import pytest

from hayate.bench.peers import PeerFailed, PeerJob, PeerProcess
from hayate.bench.report import BenchReport, notes, paired_ratios, to_json
from hayate.bench.offline import BenchPlan
from hayate.bench.rounds import rotated, run_rounds
from hayate.bench.timings import RawTimings, summarize


class FakeContender:
    def __init__(self, name: str, calls: list, max_prompt: int | None = None, fail_on_call: int | None = None):
        self.name, self.calls, self.max_prompt, self.fail_on_call = name, calls, max_prompt, fail_on_call
        self.decode_tokens, self.load_s, self.count = 4, 1.0, 0

    def accepts(self, prompt_length: int) -> bool:
        return self.max_prompt is None or prompt_length <= self.max_prompt

    def token_times(self, prompt: list[int], max_tokens: int) -> list[float]:
        self.count += 1
        if self.count == self.fail_on_call:
            raise PeerFailed("exited with code 1: boom")
        self.calls.append((self.name, len(prompt), max_tokens))
        return [0.01 * (i + 1) for i in range(max_tokens)]


def test_engines_take_turns_in_a_rotating_order():
    calls = []
    a, b = FakeContender("a", calls), FakeContender("b", calls, max_prompt=8)
    prompts = {8: [1] * 8, 16: [1] * 16}
    results = run_rounds([a, b], prompts, [1] * 8, repeats=2, progress=lambda _: None)
    warmups, first, second = calls[:2], calls[2:7], calls[7:]
    assert warmups == [("a", 8, 5), ("b", 8, 5)]
    # Round 1: a then b (b takes no 16-token prompt); round 2: b then a.
    assert first == [("a", 8, 1), ("b", 8, 1), ("a", 16, 1), ("a", 8, 5), ("b", 8, 5)]
    assert second == [("b", 8, 1), ("a", 8, 1), ("a", 16, 1), ("b", 8, 5), ("a", 8, 5)]
    assert set(results[1].ttft_rounds_ms) == {8} and len(results[0].ttft_rounds_ms[16]) == 2
    assert all(len(r.decode_rounds_tokens_per_s) == 2 and r.decode_tokens == 4 and r.ok for r in results)
    assert rotated([1, 2, 3], 4) == [2, 3, 1] and rotated([], 1) == []


def test_a_failing_peer_is_reported_and_the_others_go_on():
    calls, lines = [], []
    hayate, peer = FakeContender("hayate", calls), FakeContender("llama.cpp", calls, fail_on_call=3)
    results = run_rounds([hayate, peer], {8: [1] * 8}, [1] * 8, repeats=3, progress=lines.append)
    assert results[0].ok and len(results[0].decode_rounds_tokens_per_s) == 3
    assert results[1].status == "failed" and "boom" in results[1].error
    assert sum(1 for name, *_ in calls if name == "llama.cpp") == 2     # nothing asked of it after
    assert any("llama.cpp failed" in line for line in lines)


def test_ratios_are_paired_round_by_round():
    hayate = summarize("hayate", RawTimings({8: [0.1, 0.2]}, [[0, 0.1, 0.2], [0, 0.2, 0.4]], 8))
    peer = summarize("llama.cpp", RawTimings({8: [0.2, 0.8]}, [[0, 0.2, 0.4], [0, 0.8, 1.6]], 8))
    report = BenchReport("m", 2, "auto", BenchPlan([8], 8, 2, 2), [hayate, peer])
    assert paired_ratios(report) == {"llama.cpp": {"decode_tokens_per_s": pytest.approx([2.0, 4.0]),
                                                   "ttft_ms_8": pytest.approx([0.5, 0.25])}}
    assert to_json(report)["ratios_by_round"]["llama.cpp"]["decode_tokens_per_s"] == pytest.approx([2.0, 4.0])
    assert "hayate/llama.cpp round by round: decode tok/s 2.00 4.00; TTFT 8 0.50 0.25" in notes(report)


WORKER_WITH_FAKE_RUNNER = """
import sys
from hayate.bench import peer_worker

class Fake:
    def __init__(self, job):
        print("chatter on stdout, as libraries print")   # must not reach the answers
        print("llama.cpp: loaded " + job["model"], file=sys.stderr, flush=True)

    def token_times(self, prompt, max_tokens, stop):
        if max_tokens == 99:
            raise RuntimeError("kaboom")
        tokens = [t for t in range(max_tokens)]
        tokens = tokens[:next((i + 1 for i, t in enumerate(tokens) if t in stop), max_tokens)]
        return [0.001 * (len(prompt) + i) for i in range(len(tokens))], tokens

peer_worker.RUNNERS["llama.cpp"] = Fake
sys.exit(peer_worker.main())
"""


def fake_peer(code: str, decode_tokens: int = 4) -> PeerJob:
    return PeerJob("llama.cpp", [sys.executable, "-c", code], {}, {"engine": "llama.cpp", "model": "m.gguf"},
                   decode_tokens)


def test_peer_worker_loads_once_and_answers_each_request():
    seen = []
    peer = PeerProcess(fake_peer(WORKER_WITH_FAKE_RUNNER), timeout_s=60, echo=seen.append)
    try:
        assert peer.load_s >= 0 and peer.accepts(4096)
        assert peer.token_times([1, 2, 3], 2) == pytest.approx([0.003, 0.004])
        assert peer.token_times([1] * 10, 1) == pytest.approx([0.010])
        times, tokens = peer.generate([1, 2], 9, stop=[3, 7])   # to the first stop token, included
        assert tokens == [0, 1, 2, 3] and times == pytest.approx([0.002, 0.003, 0.004, 0.005])
        with pytest.raises(PeerFailed, match="exited with code 1: RuntimeError: kaboom"):
            peer.token_times([1], 99)
    finally:
        peer.close()
    assert peer.process.returncode is not None and seen == ["llama.cpp: loaded m.gguf"]


def test_peer_failures_are_one_line_each():
    crash = "import sys; print('first', file=sys.stderr); print('RuntimeError: boom', file=sys.stderr); sys.exit(1)"
    with pytest.raises(PeerFailed, match="code 1: RuntimeError: boom"):
        PeerProcess(fake_peer(crash), timeout_s=60)
    with pytest.raises(PeerFailed, match="unreadable answer: not json"):
        PeerProcess(fake_peer("import sys; sys.stdin.readline(); print('not json', flush=True)"), timeout_s=60)
    with pytest.raises(PeerFailed, match="unreadable answer to its job"):
        PeerProcess(fake_peer("import sys; sys.stdin.readline(); print('{\"times\": 3}', flush=True)"), timeout_s=60)
    with pytest.raises(PeerFailed, match="after 1 s"):
        PeerProcess(fake_peer("import time; time.sleep(30)"), timeout_s=1)
    silent = ("import sys, json; sys.stdin.readline(); print(json.dumps({'ready': True}), flush=True); "
              "sys.stdin.readline(); print(json.dumps({'times': []}), flush=True); sys.stdin.read()")
    peer = PeerProcess(fake_peer(silent), timeout_s=60)
    with pytest.raises(PeerFailed, match="without token times"):
        peer.token_times([1, 2], 3)
