"""Runs one forward pass over a scheduled batch and samples the next tokens."""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from hayate.engine.decode_plan import PlannedDecode
from hayate.engine.images import ImageEmbedder
from hayate.engine.kv_cache import KVCache
from hayate.engine.scheduler import ScheduledSequence, SchedulerOutput
from hayate.engine.static_decode import StaticDecode
from hayate.engine.tensor_parallel import TensorParallel, forward
from hayate.engine.verify import verify
from hayate.layers.attention import AttentionMetadata
from hayate.layers.linear import packed_linears, rearrange_for_vnni
from hayate.layers.sampler import SampleResult, Sampler
from hayate.models.config import ModelConfig
from hayate.multimodal.encoder_cache import EncoderCache
from hayate.structured.masks import GrammarMasks


@contextlib.contextmanager
def one_thread():
    """PyTorch operators on one thread: a planned step's sampling is small, and an OpenMP
    region here would leave OpenMP's workers spinning against the plan's own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class StepResult:
    """What one run of a batch produced: (index into batch.sequences, its SampleResult, its
    row there) for each sequence that sampled a token, (index, its accepted drafts and the
    model's next token) for each that verified drafts, and the sequences whose sampling failed."""
    sampled: list[tuple[int, SampleResult, int]] = field(default_factory=list)
    failed: dict[int, Exception] = field(default_factory=dict)
    verified: list[tuple[int, list[int]]] = field(default_factory=list)


def graphs_available(device: torch.device) -> bool:
    """Whether decode steps can be captured as graphs on this device (CUDA)."""
    return device.type == "cuda"


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 encoder_cache_bytes: int = 0, planned_decode: bool = True, kv_dtype: torch.dtype | None = None,
                 graphs: bool = True, max_batch: int = 1, max_len: int | None = None,
                 parallel: TensorParallel | None = None):
        """kv_dtype: the KV cache's element type; None = the weights'. graphs: capture decode
        steps of up to max_batch sequences and max_len tokens where the device can (CUDA).
        parallel: the tensor-parallel workers, which run each (eager) step with this process."""
        self.masks: GrammarMasks | None = None   # constrained rows' masks, set by the engine's first grammar
        self.model, self.parallel = model, parallel
        weight = next(model.parameters())
        self.device = weight.device
        static = graphs and graphs_available(self.device) and parallel is None
        # A static step's padding sequences write to one more block, which no request owns.
        self.kv_cache = KVCache(config, num_blocks + (1 if static else 0), block_size, dtype=kv_dtype or weight.dtype,
                                device=weight.device)
        self.kv_cache.bind(model)
        self.sampler = Sampler()
        self.images = ImageEmbedder(model, EncoderCache(encoder_cache_bytes))
        self.plan = PlannedDecode.build(model, self.kv_cache) if planned_decode else None
        if planned_decode and self.plan is None:   # an unplanned model's packed layers run the VNNI kernel
            rearrange_for_vnni(packed_linears(model))
        self.static = None
        # a model whose step's shapes depend on its data (MoE routing) cannot be captured
        if static and self.plan is None and getattr(model, "static_shapes", True):
            self.static = StaticDecode(model, self.kv_cache, num_blocks, max_batch,
                                       max_len or config.max_position_embeddings,
                                       capture=self.device.type == "cuda")

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> StepResult:
        """Run the batch and sample a token for each sequence whose tokens are all cached now;
        a sequence with drafted tokens (speculative.py) gets logits for its last token's row and
        its drafts' rows, and verifies them. An error in the forward pass raises; one in
        sampling fails only the rows that raise."""
        sequences, drafted = batch.sequences, batch.has_drafts
        # Only sequences whose every token is now cached sample the next one.
        sampling = [i for i, s in enumerate(sequences) if s.start + s.num_tokens >= s.request.num_tokens]
        states = [sequences[i].request.sampling for i in sampling]
        counts = [1 + len(sequences[i].draft_token_ids) for i in sampling] if drafted else [1] * len(sampling)
        # a mask per logits row (constrained requests never draft: theirs is their one row),
        # filled on a worker thread while the forward pass runs
        masks = (self.masks.start([state.constraint for state, count in zip(states, counts) for _ in range(count)])
                 if self.masks else None)
        rows = _logit_rows(sequences, sampling) if drafted else None
        planned = self._planned(sequences)
        if planned:
            logits = self._planned_logits(sequences, sampling, rows)
        elif self._static(sequences):   # never with drafts: one token per sequence
            logits = self._static_logits(sequences, sampling)
        else:
            logits = self._eager_logits(sequences, sampling, rows)
        if not sampling:
            return StepResult()
        if masks is not None:
            self.masks.apply(logits, masks)
        with one_thread() if planned and not self.sampler.argmax_only(states) else contextlib.nullcontext():
            if drafted:
                return self._verify_each(logits, sequences, sampling, counts)
            try:
                result = self.sampler(logits, states)
            except Exception:
                if len(sampling) == 1:
                    raise
                return self._sample_rows(logits, sampling, states)
        return StepResult([(index, result, row) for row, index in enumerate(sampling)])

    def _verify_each(self, logits: torch.Tensor, sequences: list[ScheduledSequence], sampling: list[int],
                     counts: list[int]) -> StepResult:
        """Each sampling sequence's rows on their own: drafts verified, single rows sampled."""
        step, first = StepResult(), 0
        for index, count in zip(sampling, counts):
            scheduled, rows = sequences[index], logits[first:first + count]
            first += count
            try:
                if scheduled.draft_token_ids:
                    step.verified.append((index, verify(rows, scheduled.draft_token_ids, scheduled.request.sampling)))
                else:
                    step.sampled.append((index, self.sampler(rows, [scheduled.request.sampling]), 0))
            except Exception as error:
                step.failed[index] = error
        return step

    def _sample_rows(self, logits: torch.Tensor, sampling: list[int], states: list) -> StepResult:
        """Each row on its own, after the batch's sampling raised: rows sample independently
        (each with its own generator), so the rows that do not raise get the same tokens."""
        step = StepResult()
        for row, (index, state) in enumerate(zip(sampling, states)):
            try:
                step.sampled.append((index, self.sampler(logits[row:row + 1], [state]), 0))
            except Exception as error:
                step.failed[index] = error
        return step

    def _planned(self, sequences: list[ScheduledSequence]) -> bool:
        """Steps of at most plan.max_tokens tokens in all (decodes, and short prompt chunks,
        whose tokens become rows at consecutive positions), none of them an image's; a step
        of more than one planned step's rows only while its prompt chunks end early in their
        prompts (plan.max_prefill_end), where planned rows' attention stays cheap."""
        total = sum(s.num_tokens for s in sequences)
        if self.plan is None or total > self.plan.max_tokens or self.images.touches(sequences):
            return False
        return total <= self.plan.max_batch or all(s.start + s.num_tokens <= self.plan.max_prefill_end
                                                   for s in sequences)

    def _static(self, sequences: list[ScheduledSequence]) -> bool:
        """One new token per sequence (decodes), none of them an image's, within the buckets."""
        return (self.static is not None and all(s.num_tokens == 1 for s in sequences)
                and self.static.fits(len(sequences), max(s.start for s in sequences) + 1)
                and not self.images.touches(sequences))

    def _static_logits(self, sequences: list[ScheduledSequence], sampling: list[int]) -> torch.Tensor:
        logits = self.static.run([s.request.token_ids(s.start, 1)[0] for s in sequences],
                                 [s.start for s in sequences], [s.request.block_table for s in sequences])
        return logits if len(sampling) == len(sequences) else logits[sampling]

    def _planned_logits(self, sequences: list[ScheduledSequence], sampling: list[int],
                        rows: list[int] | None = None) -> torch.Tensor:
        """Logits of each sampling sequence's last row, or of `rows` (flat indices) if given."""
        token_ids, positions, tables, last_rows = [], [], [], []
        for s in sequences:
            token_ids += s.token_ids()
            positions += range(s.start, s.start + s.num_tokens)
            tables += [s.request.block_table] * s.num_tokens
            last_rows.append(len(token_ids) - 1)
        return self.plan.run(token_ids, positions, tables,
                             logit_rows=[last_rows[i] for i in sampling] if rows is None else rows)

    def _eager_logits(self, sequences: list[ScheduledSequence], sampling: list[int],
                      rows: list[int] | None = None) -> torch.Tensor | None:
        tables, starts = [s.request.block_table for s in sequences], [s.start for s in sequences]
        counts, token_ids = [s.num_tokens for s in sequences], [t for s in sequences for t in s.token_ids()]
        if self.parallel is not None:
            hidden = self._parallel_forward(tables, starts, counts, token_ids)
        else:
            meta = AttentionMetadata.build(tables, starts, counts, self.kv_cache.block_size, self.device)
            input_ids = torch.tensor(token_ids, device=self.device)
            embeds = self.images.inputs_embeds(sequences, input_ids)
            if embeds is None:
                hidden = self.model(input_ids, meta.positions(), meta)
            else:
                hidden = self.model(input_ids, meta.positions(), meta, inputs_embeds=embeds)
        if not sampling:
            return None
        if rows is None:   # each sampling sequence's last token's row
            rows = (torch.tensor(list(itertools.accumulate(counts)), device=self.device) - 1)[sampling]
        return self.model.compute_logits(hidden[rows])

    def _parallel_forward(self, tables: list[list[int]], starts: list[int], counts: list[int],
                          token_ids: list[int]) -> torch.Tensor:
        """The step on every rank: sent to the workers, run here; any failure on the way is the
        whole group's (WorkerLostError), since the ranks' partial sums are out of step."""
        self.parallel.send(tables, starts, counts, token_ids)
        try:
            return forward(self.model, tables, starts, counts, token_ids, self.kv_cache.block_size, self.device)
        except Exception as error:
            raise self.parallel.lost() from error


def _logit_rows(sequences: list[ScheduledSequence], sampling: list[int]) -> list[int]:
    """Flat indices of the rows that get logits in a drafted step: each sampling sequence's
    last token's row and its drafts' rows."""
    ends = list(itertools.accumulate(s.num_tokens for s in sequences))
    return [row for i in sampling for row in range(ends[i] - 1 - len(sequences[i].draft_token_ids), ends[i])]
