"""The bench's schedule: every engine loaded at once, taking turns request by request.

These VMs change speed in phases that last seconds to minutes. Measured one after the
other, an engine that happens to run in a slow phase loses a ratio it would have won; taking
turns, each round runs every engine back to back (in an order that rotates from round to
round, so no engine is always first), and the ratio of one round's figures compares engines
that saw the same machine."""
from __future__ import annotations

from typing import Callable, Protocol

from hayate.bench.peers import PeerFailed
from hayate.bench.timings import EngineResult, RawTimings, decode_rate, failed, summarize

WARMUP_TOKENS = 8
Progress = Callable[[str], None]


class Contender(Protocol):
    """An engine in the rounds: hayate in this process, or a peer's worker (peers.py)."""
    name: str
    decode_tokens: int          # tokens decoded after the first, per decode request
    load_s: float

    def accepts(self, prompt_length: int) -> bool: ...

    def token_times(self, prompt: list[int], max_tokens: int) -> list[float]: ...


def rotated(items: list, by: int) -> list:
    shift = by % len(items) if items else 0
    return items[shift:] + items[:shift]


def run_rounds(contenders: list[Contender], prompts: dict[int, list[int]], decode_prompt: list[int],
               repeats: int, progress: Progress) -> list[EngineResult]:
    """One warm-up request each, then `repeats` rounds of: time to first token at every
    prompt length, then one decode request, every engine in turn. A peer that fails is
    reported failed and left out of the later rounds; hayate's own errors propagate."""
    raws = {c.name: RawTimings({n: [] for n in prompts if c.accepts(n)}, [], len(decode_prompt), c.load_s)
            for c in contenders}
    errors: dict[str, str] = {}

    def attempt(contender: Contender, prompt: list[int], max_tokens: int) -> list[float] | None:
        if contender.name in errors:
            return None
        try:
            return contender.token_times(prompt, max_tokens)
        except PeerFailed as error:
            errors[contender.name] = str(error)
            progress(f"bench: {contender.name} failed: {error}")
            return None

    for contender in contenders:
        attempt(contender, decode_prompt, min(contender.decode_tokens, WARMUP_TOKENS) + 1)
    for round_index in range(repeats):
        order = rotated(contenders, round_index)
        for length, prompt in prompts.items():
            for contender in order:
                if contender.accepts(length) and (times := attempt(contender, prompt, 1)):
                    raws[contender.name].ttft_s[length].append(times[0])
        for contender in order:
            if times := attempt(contender, decode_prompt, contender.decode_tokens + 1):
                raws[contender.name].decode_token_times_s.append(times)
        progress(f"bench: round {round_index + 1}/{repeats}: decode tok/s " + ", ".join(
            f"{c.name} {decode_rate(raws[c.name].decode_token_times_s[-1]):.1f}"
            for c in order if c.name not in errors and raws[c.name].decode_token_times_s))
    return [failed(c.name, errors[c.name]) if c.name in errors else summarize(c.name, raws[c.name])
            for c in contenders]
