"""The engine side of one API request: its choices (n per prompt) checked, queued together,
their outputs merged as they come, and everything aborted if the client goes away."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from hayate.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from hayate.engine.request import ImageTimings, RequestFailedError, RequestOutput, SpeculativeCounts, TokenLogprob
from hayate.multimodal.features import PromptImages
from hayate.sampling import SamplingParams
from hayate.server.errors import RETRY_AFTER_S, SERVER_ERROR, APIError
from hayate.server.floor import floor_share
from hayate.server.metrics import RequestTracker, ServerMetrics
from hayate.server.protocol import SamplingFields
from hayate.server.responses import CompletionTokensDetails, ImageUsage, PromptTokensDetails, Usage
from hayate.server.state import ServedModel


@dataclass
class ChoiceSpec:
    index: int                  # the choice's index in the response
    prompt_index: int           # which prompt it answers (completions may send several)
    prompt_ids: list[int]
    params: SamplingParams
    images: PromptImages | None = None


def choice_specs(body: SamplingFields, model: ServedModel, prompts: list[list[int]],
                 logprobs: int | None, prompt_param: str, images: PromptImages | None = None,
                 adjust: Callable[[SamplingParams], SamplingParams] | None = None) -> list[ChoiceSpec]:
    """n choices per prompt, each checked against the context and the engine; 400 if not.
    `adjust` changes each choice's parameters (tools: their grammar) before the check."""
    specs = []
    for prompt_index, prompt_ids in enumerate(prompts):
        max_tokens = _max_tokens(body.requested_max_tokens, len(prompt_ids), model.max_model_len, prompt_param)
        for choice in range(body.n):
            params = _params(body, max_tokens, logprobs, choice)
            params = adjust(params) if adjust is not None else params
            try:
                model.engine.validate(prompt_ids, params, images)
            except ValueError as error:
                raise APIError(400, str(error), param=body.field_named(str(error)) or prompt_param) from None
            specs.append(ChoiceSpec(len(specs), prompt_index, prompt_ids, params, images))
    return specs


def _max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, prompt_param: str) -> int:
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise APIError(400, f"the prompt has {num_prompt_tokens} tokens; this model's context holds "
                            f"{max_model_len}, including the answer", param=prompt_param,
                       code="context_length_exceeded")
    if requested is not None and requested > room:
        raise APIError(400, f"this model's context holds {max_model_len} tokens, but {num_prompt_tokens + requested} "
                            f"were requested ({num_prompt_tokens} in the prompt, {requested} for the answer); "
                            f"ask for at most {room} tokens", param="max_tokens", code="context_length_exceeded")
    return room if requested is None else requested


def _params(body: SamplingFields, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs, index)
    except ValueError as error:
        raise APIError(400, str(error), param=body.field_named(str(error))) from None


@dataclass
class ChoiceState:
    """One choice's engine request and what it has produced so far."""
    spec: ChoiceSpec
    request_id: str
    outputs: AsyncIterator[RequestOutput]
    tracker: RequestTracker
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, output: RequestOutput) -> None:
        self.text.append(output.text)
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        self.last = output
        self.tracker.observe(output)

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason if self.last is not None else None


class ChoiceRun:
    """All engine requests of one API request. Queued at construction (errors raise then, as
    APIError); iterate `events()` to the end, or the requests still running are aborted."""

    def __init__(self, model: ServedModel, metrics: ServerMetrics, response_id: str, specs: list[ChoiceSpec]):
        self.engine: AsyncEngine = model.engine
        self.metrics = metrics
        self.choices: list[ChoiceState] = []
        try:
            for spec in specs:
                request_id = f"{response_id}-{spec.index}"
                outputs = self.engine.submit(request_id, spec.prompt_ids, spec.params, spec.images)
                self.choices.append(ChoiceState(spec, request_id, outputs, metrics.track(len(spec.prompt_ids))))
        except Exception as error:
            self.abort()
            raise engine_error(error) from None

    @property
    def done(self) -> bool:
        return all(choice.finished for choice in self.choices)

    def events(self) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
        """(choice, output) in the order the engine makes them, all choices merged."""
        if len(self.choices) == 1:   # nothing to merge: no pump task and queue hop per token
            return self._events_of_one(self.choices[0])
        return self._merged_events()

    async def _events_of_one(self, choice: ChoiceState) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
        try:
            async for output in choice.outputs:
                choice.add(output)
                yield choice, output
        except Exception as error:
            raise engine_error(error) from None
        finally:
            self.abort()
            await choice.outputs.aclose()

    async def _merged_events(self) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(choice, queue)) for choice in self.choices]
        try:
            for _ in range(len(pumps)):
                while (item := await queue.get()) is not None:
                    if isinstance(item, Exception):
                        raise engine_error(item)
                    item[0].add(item[1])
                    yield item
        finally:
            for pump in pumps:
                pump.cancel()
            self.abort()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def collect(self) -> list[ChoiceState]:
        async for _ in self.events():
            pass
        return self.choices

    def abort(self) -> None:
        for choice in self.choices:
            if not choice.finished:
                self.engine.abort(choice.request_id)
                choice.tracker.abandon()

    def usage(self) -> Usage:
        prompts = {choice.spec.prompt_index: len(choice.spec.prompt_ids) for choice in self.choices}
        cached: dict[int, int] = {}   # a prompt's choices run as separate requests: count it once
        for choice in self.choices:
            if choice.last is not None:
                cached[choice.spec.prompt_index] = max(cached.get(choice.spec.prompt_index, 0),
                                                       choice.last.num_cached_tokens)
        completion_tokens = sum(len(choice.token_ids) for choice in self.choices)
        timings = [choice.last.timings for choice in self.choices if choice.last is not None]
        arrival = min((t.arrival for t in timings), default=0.0)
        scheduled = min((t.first_scheduled for t in timings if t.first_scheduled), default=arrival)
        first_token = min((t.first_token for t in timings if t.first_token), default=scheduled)
        finished = max((t.finished for t in timings if t.finished), default=first_token)
        prompt_time, completion_time = first_token - scheduled, finished - first_token
        return Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion_tokens,
                     total_tokens=sum(prompts.values()) + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values()),
                                                               image_tokens=_image_tokens(timings)),
                     queue_time=scheduled - arrival, prompt_time=prompt_time,
                     completion_time=completion_time, total_time=prompt_time + completion_time,
                     completion_tokens_details=_predictions([t.speculative for t in timings if t.speculative]),
                     image_usage=_image_usage([t.images for t in timings if t.images is not None]),
                     floor_share=floor_share(self.metrics.floor, [c.last for c in self.choices if c.last is not None]))


def _predictions(counts: list[SpeculativeCounts]) -> CompletionTokensDetails | None:
    """Speculative decoding's drafts, accepted and not, over the choices that drafted."""
    if not counts:
        return None
    drafted, accepted = sum(c.num_draft_tokens for c in counts), sum(c.num_accepted_tokens for c in counts)
    return CompletionTokensDetails(accepted_prediction_tokens=accepted, rejected_prediction_tokens=drafted - accepted)


def _image_tokens(timings: list) -> int | None:
    """The prompt's image tokens (the choices share one prompt); None without images."""
    return next((t.images.num_image_tokens for t in timings if t.images is not None), None)


def _image_usage(images: list[ImageTimings]) -> ImageUsage | None:
    """The choices share one prompt's images: count them once; add up the encoder's work."""
    if not images:
        return None
    return ImageUsage(images=images[0].num_images, image_tokens=images[0].num_image_tokens,
                      decode_time=images[0].load, preprocess_time=images[0].preprocess,
                      encode_time=sum(i.encode for i in images),
                      encoder_cache_hits=sum(i.encoder_cache_hits for i in images))


async def _pump(choice: ChoiceState, queue: asyncio.Queue) -> None:
    try:
        async for output in choice.outputs:
            queue.put_nowait((choice, output))
    except Exception as error:
        queue.put_nowait(error)
    finally:
        queue.put_nowait(None)


def engine_error(error: Exception) -> Exception:
    """What the client is told when the engine refuses or fails a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFullError):
        return APIError(429, f"the server is busy ({error}); retry shortly", type="rate_limit_error",
                        code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), type=SERVER_ERROR, code="engine_unavailable")
    if isinstance(error, RequestFailedError):   # the server's fault, this request's alone
        return APIError(500, f"{error}; see the server log", type=SERVER_ERROR, code="internal_error")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return error

