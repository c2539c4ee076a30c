"""The engine core: step() = schedule, run the model, turn sampled tokens into outputs."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import psutil
import torch

from hayate.config import EngineConfig
from hayate.engine.block_manager import BlockManager
from hayate.engine.kv_cache import KVCache, kv_cache_dtype
from hayate.engine.images import RequestImages
from hayate.engine.model_runner import ModelRunner, StepResult
from hayate.engine.request import EngineStats, RequestOutput, RequestStatus, RequestTimings, TokenLogprob
from hayate.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from hayate.engine.sequence import Sequence
from hayate.engine.draft_policy import ASSUMED_ROW_COST, StepCosts
from hayate.engine.draft_model import DraftModel
from hayate.engine.speculative import DraftSettings, NgramDrafter, TokenTexts, speculation_for
from hayate.engine.tensor_parallel import TensorParallel, WorkerLostError
from hayate.layers.tensor_parallel import check_shardable
from hayate.layers.sampler import SampleResult, SamplingState
from hayate.loading.loader import LoadedModel
from hayate.loading.tokenizer import IncrementalDetokenizer
from hayate.models.config import ModelConfig
from hayate.multimodal.features import PromptImages
from hayate.sampling import MAX_DRAFT_TOKENS, SamplingParams, StopStringMatcher
from hayate.structured.backend import GrammarBackend, LLGuidanceBackend, RoutedBackend, advance
from hayate.structured.masks import GrammarMasks
from hayate.structured.spec import GrammarError, GrammarSpec
from hayate.structured.xgrammar_backend import XGrammarBackend

log = logging.getLogger("hayate.engine")


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, next(loaded.model.parameters()).dtype)
        blocks = BlockManager(_kv_cache_blocks(config, loaded, kv_dtype), config.block_size, config.prefix_caching)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(loaded.config.eos_token_ids)
        self.vocab_size, self.max_num_seqs = loaded.config.vocab_size, config.max_num_seqs
        self._grammars: GrammarBackend | None | bool = False   # False: not built yet
        self.grammar_backend = config.grammar_backend
        self._grammar_lock = threading.Lock()
        self.fast_forward = config.grammar_fast_forward
        self.parallel, model_config = _tensor_parallel(config, loaded, blocks.num_blocks)
        self.runner = ModelRunner(loaded.model, model_config, blocks.num_blocks, config.block_size,
                                  encoder_cache_bytes=config.encoder_cache_mb * 1024 * 1024,
                                  planned_decode=config.plans_decode, kv_dtype=kv_dtype,
                                  graphs=config.cuda_graphs, max_batch=config.max_num_seqs,
                                  max_len=loaded.max_model_len, parallel=self.parallel)
        self.image_token_id: int | None = getattr(loaded.model, "image_token_id", None)
        plan = self.runner.plan
        self.scheduler = Scheduler(blocks, config.max_num_seqs, token_budget=config.prefill_chunk,
                                   step_tokens=plan.max_batch if plan is not None else 0,
                                   planned_prefix=plan.max_tokens if plan is not None else 0)
        self.sequences: dict[str, Sequence] = {}
        self.draft_settings = DraftSettings(config.speculative, config.speculative_tokens, config.speculative_ngram)
        self.token_texts = TokenTexts(self.tokenizer.token_text)   # what prompt lookup's copies compare
        # a draft model's cache holds as many tokens as the target's
        self.draft = (DraftModel.load(config, loaded, blocks.num_blocks * config.block_size)
                      if config.speculative_model else None)
        if config.speculative is not None:
            self.scheduler.drafter = self._drafter()

    @property
    def grammars(self) -> GrammarBackend | None:
        """The grammar backend, built by the first constrained request or at `hayate serve`'s
        load (0.3-3 s: llguidance and xgrammar read the vocabulary); None when llguidance
        cannot read the tokenizer."""
        with self._grammar_lock:
            if self._grammars is False:
                self._grammars = _grammar_backend(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                                  self.grammar_backend)
                if self._grammars is not None:
                    self.runner.masks = GrammarMasks(self._grammars, self.max_num_seqs)
            return self._grammars

    @property
    def accepts_images(self) -> bool:
        return self.image_token_id is not None

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams,
                         images: PromptImages | None = None) -> None:
        """Raise ValueError if this request can never run here (reads only constants)."""
        self._checked(prompt_token_ids, params, images)

    def _checked(self, prompt_token_ids: list[int], params: SamplingParams,
                 images: PromptImages | None) -> RequestImages | None:
        """validate_request's checks; returns where the prompt's image tokens are, if any."""
        request_images = None
        if params.speculative == "draft" and self.draft is None:
            raise ValueError('speculative "draft" needs a draft model: start with one (--speculative draft:MODEL)')
        if images and not self.accepts_images:
            raise ValueError("this model does not accept images")
        if images:
            request_images = RequestImages.create(images, prompt_token_ids, self.image_token_id)
        elif self.accepts_images and self.image_token_id in prompt_token_ids:
            raise ValueError("the prompt contains image tokens but no images")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context "
                             f"holds {self.max_model_len}, including the answer")
        if max(prompt_token_ids) >= self.runner.model.config.vocab_size or min(prompt_token_ids) < 0:
            raise ValueError("the prompt contains token ids outside the vocabulary")
        params.check_vocab(self.runner.model.config.vocab_size)
        if params.grammar is not None:
            self.compile_grammar(params.grammar)
        return request_images

    def _drafter(self) -> NgramDrafter:
        """Speculative decoding's drafter, knowing what steps of more rows cost here: timed on
        the planned step (at start-up, or ~0.5 s the first speculative request waits), else
        assumed."""
        plan = self.runner.plan
        costs = StepCosts.of_plan(plan, self.scheduler.blocks) if plan is not None else None
        per_row = ASSUMED_ROW_COST.get(self.runner.device.type, ASSUMED_ROW_COST["cpu"])
        return NgramDrafter(self.max_model_len, costs or StepCosts.assumed(MAX_DRAFT_TOKENS + 1, per_row))

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile (or find in the cache) a request's grammar; GrammarError (a ValueError) if it
        cannot be used. Safe from any thread: a server calls it before admitting the request."""
        grammars = self.grammars
        if grammars is None:
            raise GrammarError("structured output is not available: llguidance could not read this model's tokenizer")
        grammars.compile(spec)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    images: PromptImages | None = None) -> None:
        """Queue a request (a vision model's with its processed images, whose tokens the prompt
        already holds); raises ValueError (before any work) if it cannot run."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        request_images = self._checked(prompt_token_ids, params, images)
        sampling = SamplingState.create(params, list(prompt_token_ids), device=self.runner.device)
        sampling.constraint = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        speculation = speculation_for(params, self.draft_settings, self.draft, request_id, self.token_texts)
        if speculation is not None and self.scheduler.drafter is None:
            self.scheduler.drafter = self._drafter()
        sequence = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
            stop_matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output),
            timings=RequestTimings(arrival=time.perf_counter(),
                                   images=request_images.timings if request_images else None,
                                   speculative=speculation.counts if speculation else None),
            images=request_images, cache_prefix=request_images is None and self.scheduler.blocks.prefix_caching,
            speculation=speculation)
        self.sequences[request_id] = sequence
        self.scheduler.add(sequence)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks now; unknown or finished ids are ignored."""
        sequence = self.sequences.pop(request_id, None)
        if sequence is not None:
            self._finish(sequence, "abort")

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        blocks = scheduler.blocks
        return EngineStats(num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                           kv_cache_usage=scheduler.kv_cache_usage,
                           prefix_cache_hit_rate=blocks.hit_tokens / max(blocks.queried_tokens, 1))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def check_workers(self) -> None:
        """Raise WorkerLostError if a tensor-parallel worker has exited (between steps too)."""
        if self.parallel is not None:
            self.parallel.check()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (they also stop when this process ends)."""
        if self.parallel is not None:
            self.parallel.close()

    def step(self) -> list[RequestOutput]:
        """Schedule, run, postprocess. A request whose part of the step raises fails alone
        (finish_reason "error"); the batch, the KV cache and the loop go on."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        self._mark_scheduled(batch)
        step = self._execute(batch)
        failed = [self._fail(batch.sequences[i].request, error) for i, error in step.failed.items()]
        self._advance(batch)
        sampled = [self._append_or_fail(batch.sequences[i].request, result, row) for i, result, row in step.sampled]
        return failed + sampled + [self._accept_or_fail(batch.sequences[i], tokens) for i, tokens in step.verified]

    def _mark_scheduled(self, batch: SchedulerOutput) -> None:
        now = time.perf_counter()
        for preempted in batch.preempted:
            preempted.status = RequestStatus.WAITING
        for scheduled in batch.sequences:
            scheduled.request.status = RequestStatus.RUNNING
            scheduled.request.timings.first_scheduled = scheduled.request.timings.first_scheduled or now

    def _execute(self, batch: SchedulerOutput) -> StepResult:
        """The runner's step; if it raises, each sequence again on its own (its keys and values
        are rewritten with the same values), so only the requests that raise alone fail."""
        try:
            return self.runner.execute(batch)
        except WorkerLostError:   # the ranks are out of step: no request can run again
            raise
        except Exception as error:
            if len(batch.sequences) == 1:
                return StepResult(failed={0: error})
            log.warning("a step of %d requests failed (%s); running them one by one",
                        len(batch.sequences), error)
        step = StepResult()
        for index, scheduled in enumerate(batch.sequences):
            try:
                alone = self.runner.execute(SchedulerOutput([scheduled], []))
            except Exception as error:
                step.failed[index] = error
                continue
            step.sampled += [(index, result, row) for _, result, row in alone.sampled]
            step.verified += [(index, tokens) for _, tokens in alone.verified]
            step.failed.update({index: error for error in alone.failed.values()})
        return step

    def _advance(self, batch: SchedulerOutput) -> None:
        """Count the tokens this step cached, and register the blocks it filled (drafts count
        once accepted, in _accept)."""
        for scheduled in batch.sequences:
            request = scheduled.request
            if request.status is RequestStatus.FINISHED:   # failed in this step
                continue
            self._computed(request, scheduled.num_tokens - len(scheduled.draft_token_ids))

    def _computed(self, sequence: Sequence, num_tokens: int) -> None:
        sequence.num_computed_tokens += num_tokens
        if sequence.cache_prefix:
            self.scheduler.blocks.register(sequence, sequence.num_computed_tokens)

    def _fail(self, sequence: Sequence, error: Exception) -> RequestOutput:
        """End one request on an error of its own; its KV blocks are freed at once."""
        log.error("request %s failed: %s: %s", sequence.request_id, type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        self._finish(sequence, "error")
        return RequestOutput(
            request_id=sequence.request_id, text="", token_ids=[], finished=True, finish_reason="error",
            num_prompt_tokens=len(sequence.prompt_token_ids), num_output_tokens=len(sequence.output_token_ids),
            timings=sequence.timings, num_cached_tokens=sequence.num_cached_tokens,
            error=f"{type(error).__name__}: {error}")

    def _append_or_fail(self, sequence: Sequence, result: SampleResult, row: int) -> RequestOutput:
        try:
            return self._append(sequence, result.token_ids[row], _logprobs(result, row, sequence.sampling))
        except Exception as error:   # detokenizing or stop matching this request
            return self._fail(sequence, error)

    def _accept_or_fail(self, scheduled: ScheduledSequence, tokens: list[int]) -> RequestOutput:
        try:
            return self._accept(scheduled, tokens)
        except Exception as error:
            return self._fail(scheduled.request, error)

    def _accept(self, scheduled: ScheduledSequence, tokens: list[int]) -> RequestOutput:
        """Append a drafted step's tokens (its accepted drafts, then the model's own) one by
        one, as plain steps would have: a stop drops the rest. An accepted draft's key and
        value are in the cache, so it counts as computed once the next token follows it."""
        sequence = scheduled.request
        sequence.speculation.record(len(scheduled.draft_token_ids), len(tokens) - 1)
        outputs = []
        for token_id in tokens:
            if outputs:
                self._computed(sequence, 1)
            outputs.append(self._append(sequence, token_id, []))
            if outputs[-1].finished:
                break
        return RequestOutput.joined(outputs)

    def _append(self, sequence: Sequence, token_id: int, logprobs: list[TokenLogprob]) -> RequestOutput:
        sequence.output_token_ids.append(token_id)
        sequence.timings.first_token = sequence.timings.first_token or time.perf_counter()
        reason = self._stop_reason(sequence, token_id)
        text = "" if reason == "stop" else sequence.detokenizer.push(token_id)
        token_ids = [token_id]
        if reason != "stop" and sequence.sampling.constraint is not None:
            forced, complete = self._follow_grammar(sequence, token_id)
            token_ids += forced
            text += "".join(sequence.detokenizer.push(forced_id) for forced_id in forced)
            reason = "stop" if complete else reason or self._length_reason(sequence)
        text, hit_stop_string = sequence.stop_matcher.feed(text)
        if hit_stop_string:
            reason = "stop"
        elif reason is not None:
            text += sequence.stop_matcher.feed(sequence.detokenizer.flush())[0] + sequence.stop_matcher.flush()
        if reason is not None:
            self._finish(sequence, reason)
        return RequestOutput(
            request_id=sequence.request_id, text=text, token_ids=token_ids,
            finished=reason is not None, finish_reason=reason,
            num_prompt_tokens=len(sequence.prompt_token_ids),
            num_output_tokens=len(sequence.output_token_ids),
            timings=sequence.timings, logprobs=logprobs, num_cached_tokens=sequence.num_cached_tokens)

    def _stop_reason(self, sequence: Sequence, token_id: int) -> str | None:
        params = sequence.sampling.params
        if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            return "stop"
        return self._length_reason(sequence)

    def _length_reason(self, sequence: Sequence) -> str | None:
        if (len(sequence.output_token_ids) >= sequence.sampling.params.max_tokens
                or sequence.num_tokens >= self.max_model_len):
            return "length"
        return None

    def _follow_grammar(self, sequence: Sequence, token_id: int) -> tuple[list[int], bool]:
        """Advance a constrained request's grammar past its sampled token and append the tokens
        it forces next (fast-forward: they run as one prompt chunk in the next step). Not with
        logprobs: forced tokens were never sampled, so they would have none."""
        params = sequence.sampling.params
        room = min(params.max_tokens - len(sequence.output_token_ids), self.max_model_len - sequence.num_tokens)
        forced, complete = advance(sequence.sampling.constraint, token_id, room,
                                   self.fast_forward and params.logprobs is None)
        sequence.output_token_ids.extend(forced)
        return forced, complete

    def _finish(self, sequence: Sequence, reason: str) -> None:
        sequence.status, sequence.finish_reason = RequestStatus.FINISHED, reason
        sequence.timings.finished = time.perf_counter()
        sequence.images = None   # the embeddings may be large; the timings keep their record
        if sequence.speculation is not None:
            sequence.speculation.release()
        self.scheduler.finish(sequence)
        self.sequences.pop(sequence.request_id, None)


def _grammar_backend(tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
                     choice: str) -> GrammarBackend | None:
    """The model's grammar backend, or None, with a warning, when llguidance cannot read its
    tokenizer: constrained requests are then refused. With choice "auto", xgrammar takes the
    JSON schemas it enforces alike where it is installed and reads the tokenizer."""
    try:
        checker = LLGuidanceBackend.for_tokenizer(tokenizer, vocab_size, eos_token_ids)
    except Exception as error:
        log.warning("structured output unavailable: llguidance could not read the tokenizer (%s)", error)
        return None
    if choice == "llguidance":
        return checker
    try:
        return RoutedBackend(checker, XGrammarBackend.for_tokenizer(tokenizer, vocab_size, eos_token_ids))
    except Exception as error:   # ImportError, or a vocabulary xgrammar cannot read
        log.warning("xgrammar unavailable (%s): llguidance fills every grammar mask", error)
        return checker


def _tensor_parallel(config: EngineConfig, loaded: LoadedModel,
                     num_blocks: int) -> tuple[TensorParallel | None, ModelConfig]:
    """The workers of tensor parallel (None without), started and joined, and the loaded model
    cut to rank 0's slices; the model config of this rank's KV cache (its key-value heads)."""
    if config.tensor_parallel == 1:
        return None, loaded.config
    check_shardable(loaded.config, config.tensor_parallel)
    if loaded.processor is not None:
        raise ValueError("tensor parallel runs text models only, not an image model")
    parallel = TensorParallel.start(config, num_blocks)
    heads, kv_heads = parallel.shard(loaded.model, config.expert_parallel)
    log.info("tensor parallel over %d ranks (gloo); this rank runs %d of %d query heads",
             config.tensor_parallel, heads, loaded.config.num_attention_heads)
    return parallel, dataclasses.replace(loaded.config, num_attention_heads=heads, num_key_value_heads=kv_heads)


def _kv_cache_blocks(config: EngineConfig, loaded: LoadedModel, kv_dtype: torch.dtype) -> int:
    """Blocks for config.kv_cache_tokens, or by default room for every sequence at full
    length, capped at a fifth of memory (a half-precision cache: twice the tokens) but never
    below one full-length sequence."""
    per_token = KVCache.bytes_per_token(loaded.config, kv_dtype)
    tokens = config.kv_cache_tokens
    if tokens is None:
        tokens = min(config.max_num_seqs * loaded.max_model_len, psutil.virtual_memory().total // 5 // per_token)
    if tokens < loaded.max_model_len:
        raise ValueError(f"the KV cache ({tokens} tokens) must hold at least one full context "
                         f"({loaded.max_model_len} tokens)")
    return -(-tokens // config.block_size)


def _logprobs(result: SampleResult, row: int, state: SamplingState) -> list[TokenLogprob]:
    wanted = state.params.logprobs
    if wanted is None or result.logprobs is None:
        return []
    top: list[tuple[int, float]] = []
    if result.top_logprobs is not None and wanted > 0:
        values, ids = result.top_logprobs
        top = [(int(i), float(v)) for i, v in zip(ids[row, :wanted], values[row, :wanted])
               if v != float("-inf")]   # tokens a grammar masked away are no alternatives
    return [TokenLogprob(result.token_ids[row], float(result.logprobs[row]), top)]
