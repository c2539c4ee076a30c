"""Speculative decoding with a draft model: a smaller model with the target's vocabulary (for
example Qwen2.5-Coder-0.5B for the 1.5B) drafts greedily on its own runner, KV cache and
blocks; the target verifies its drafts as it verifies prompt lookup's (speculative.py,
verify.py), so answers stay exactly those without speculation, greedy or sampled.

A speculating sequence keeps the tokens its draft cache holds. Each time it drafts, the draft
model first runs the tokens the sequence gained since (the whole prompt the first time; after
that the tokens accepted since, from where the cached ones stop agreeing with the sequence),
then one token a step. How many tokens it drafts follows its acceptance and what both the
target's wider step and the draft's steps cost (draft_policy.py): a draft model of the
target's family agrees with it far more often than prompt lookup's copies do (Qwen2.5-Coder
0.5B with the 1.5B: 98% of greedy drafts on a code edit), so its acceptance starts from a
firmer prior; where the draft model is not much cheaper than the target, it drafts only while
nearly every draft is accepted. The first draft runs the whole prompt through the draft model
(a prefill of its own, in the decode's time), and one after a pause the tokens since: that cost,
shared by the steps the sequence has left, is weighed too."""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time

from hayate.config import EngineConfig
from hayate.engine.block_manager import BlockManager
from hayate.engine.draft_policy import Acceptance, StepCosts
from hayate.engine.model_runner import ModelRunner
from hayate.engine.request import SpeculativeCounts
from hayate.engine.scheduler import ScheduledSequence, SchedulerOutput
from hayate.loading.loader import LoadedModel, load_model
from hayate.layers.sampler import SamplingState
from hayate.sampling import SamplingParams


log = logging.getLogger("hayate.engine")

# acceptance pseudo-counts (accepted, rejected): 0.9, held firmly enough that one rejection
# does not stop drafting (prompt lookup's prior is 0.8, held lightly)
DRAFT_MODEL_PRIOR = (9.0, 1.0)


class DraftSequence:
    """A sequence's tokens in the draft model's cache (the runner's view of a request)."""

    def __init__(self, request_id: str, device):
        self.request_id, self.block_table, self.tokens = request_id, [], []
        self.block_hashes: list[int] = []
        self.num_computed_tokens = self.num_cached_tokens = 0
        self.cache_prefix, self.images = False, None
        self.sampling = SamplingState.create(SamplingParams(temperature=0, max_tokens=1), [0], device=device)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_ids(self, start: int, count: int) -> list[int]:
        return self.tokens[start:start + count]


class DraftModel:
    """The draft model, loaded beside the target, and its greedy drafting."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, num_tokens: int):
        self.max_model_len = loaded.max_model_len
        blocks = -(-num_tokens // config.block_size)
        self.blocks = BlockManager(blocks, config.block_size, prefix_caching=False)
        self.runner = ModelRunner(loaded.model, loaded.config, blocks, config.block_size,
                                  planned_decode=config.planned_decode, graphs=False)
        self.step_seconds, self.catch_up_seconds = self._time_steps()

    @classmethod
    def load(cls, config: EngineConfig, target: LoadedModel, num_tokens: int) -> "DraftModel":
        """config.speculative_model loaded with the target's settings, its context capped at the
        target's; ValueError, before any step runs, unless it shares the target's vocabulary and
        tokenizer."""
        settings = dataclasses.replace(config, model=config.speculative_model, mmproj=None, speculative=None,
                                       speculative_model=None, max_model_len=target.max_model_len)
        loaded = load_model(settings)
        if loaded.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft model {loaded.path.name} has {loaded.config.vocab_size} token ids, the "
                             f"target {target.config.vocab_size}: a draft model must share the target's vocabulary")
        _check_tokenizer(loaded.tokenizer, target.tokenizer)
        return cls(loaded, config, num_tokens)

    def draft(self, sequence: DraftSequence, tokens: list[int], length: int) -> list[int]:
        """Up to `length` greedy tokens to follow `tokens` (the sequence's, all of them); fewer
        where the draft's blocks or context run out."""
        if len(tokens) + length > self.max_model_len:
            return []
        common = 0
        for ours, theirs in zip(sequence.tokens, tokens[:-1]):   # the last one runs again at least
            if ours != theirs:
                break
            common += 1
        sequence.tokens = list(tokens)
        drafted, start = [], common
        while len(drafted) < length:
            if not self.blocks.grow(sequence.block_table, sequence.num_tokens):
                sequence.tokens = sequence.tokens[:start]   # what the cache really holds
                break
            step = SchedulerOutput([ScheduledSequence(sequence, start, sequence.num_tokens - start)], [])
            token = self.runner.execute(step).sampled[0][1].token_ids[0]
            drafted.append(token)
            start = sequence.num_tokens
            if len(drafted) < length:
                sequence.tokens.append(token)
        return drafted

    def release(self, sequence: DraftSequence) -> None:
        self.blocks.release(sequence.block_table)
        sequence.tokens = []

    def _time_steps(self, steps: int = 5, rows: int = 16) -> tuple[float, float]:
        """Seconds of one draft token (a one-row step of the draft model) and of each token
        it catches up on (in steps of `rows` new tokens), timed now."""
        sequence = DraftSequence("timing", self.runner.device)
        self.draft(sequence, [0], 1)   # warm-up
        one, many = [], []
        for step in range(steps):
            known = len(sequence.tokens)
            for times, new in ((one, 1), (many, rows)):
                began = time.perf_counter()
                self.draft(sequence, [0] * (known + new), 1)
                times.append(time.perf_counter() - began)
                known += new
        self.release(sequence)
        return statistics.median(one), statistics.median(many) / rows


PROBE = "Hello, world! def f(x):\n    return x ** 2  # ünïcode, 12345"


def _check_tokenizer(draft, target) -> None:
    """ValueError unless the draft's tokenizer is the target's (the same ids for a probe text,
    the same end-of-sequence ids)."""
    if (draft.encode(PROBE, add_special_tokens=False) != target.encode(PROBE, add_special_tokens=False)
            or draft.eos_token_ids != target.eos_token_ids):
        raise ValueError("the draft model's tokenizer is not the target's: a draft model must share it")


class ModelSpeculation:
    """One sequence's drafting by the draft model (Speculation's interface, speculative.py)."""

    def __init__(self, settings, draft: DraftModel, request_id: str):
        self.settings, self.model = settings, draft
        self.sequence = DraftSequence(request_id, draft.runner.device)
        self.acceptance = Acceptance(DRAFT_MODEL_PRIOR)
        self.failed = False
        self.counts = SpeculativeCounts()

    def propose(self, sequence, room: int, costs: StepCosts, decodes: int, rows: int) -> list[int]:
        """Drafts for the sequence; none once the draft model has failed it (the error is
        logged; the request goes on without speculation)."""
        if self.failed:
            return []
        self.acceptance.step()
        unseen = max(sequence.num_tokens - len(self.sequence.tokens), 1)
        remaining = sequence.sampling.params.max_tokens - len(sequence.output_token_ids)
        length = costs.best_draft(self.acceptance.rate, room, decodes, rows, per_token=self.model.step_seconds,
                                  setup=unseen * self.model.catch_up_seconds, remaining=remaining)
        if not length:
            return []
        try:
            return self.model.draft(self.sequence, sequence.token_ids(0, sequence.num_tokens), length)
        except Exception:   # the draft model's own failure must not fail the target's request
            log.exception("the draft model failed request %s; it goes on without drafts", self.sequence.request_id)
            self.failed = True
            self.release()
            return []

    def record(self, drafted: int, accepted: int) -> None:
        self.counts.num_draft_tokens += drafted
        self.counts.num_accepted_tokens += accepted
        self.counts.num_draft_steps += 1
        self.acceptance.record(drafted, accepted)

    def release(self) -> None:
        self.model.release(self.sequence)
