"""Requests as the engine tracks them, and the outputs it hands back."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestFailedError(RuntimeError):
    """A request failed inside the engine (a bug or a fault of its own); the others went on."""

    @classmethod
    def of(cls, output: "RequestOutput") -> "RequestFailedError":
        return cls(f"the engine failed on request {output.request_id} ({output.error})")


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # queued (or preempted), holds no KV blocks
    RUNNING = "running"      # holds KV blocks: prefilling or decoding
    FINISHED = "finished"


@dataclass
class ImageTimings:
    """Where an image request's time went before its first token (seconds)."""
    num_images: int
    preprocess: float              # the processor (resize, tiles, normalisation), before the engine
    load: float = 0.0              # reading or fetching, and decoding, the images, at the edge
    encode: float = 0.0            # the vision encoder, for the images the cache lacked
    encoder_cache_hits: int = 0    # images whose embeddings came from the encoder cache
    num_image_tokens: int = 0      # the prompt's image tokens, all images together


@dataclass
class SpeculativeCounts:
    """A speculative request's drafted tokens, and how many of them the model accepted."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_draft_steps: int = 0       # steps that verified a draft

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / max(self.num_draft_tokens, 1)


@dataclass
class RequestTimings:
    """Wall-clock instants (time.perf_counter) of one request's life."""
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    images: ImageTimings | None = None     # set for requests with images
    speculative: SpeculativeCounts | None = None   # set for requests that draft tokens (engine/speculative.py)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""
    request_id: str
    text: str                       # new text since the previous output
    token_ids: list[int]            # new token ids since the previous output
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" | "error" when finished
    num_prompt_tokens: int
    num_output_tokens: int
    timings: RequestTimings
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0      # prompt tokens whose keys and values came from the prefix cache
    error: str | None = None        # with finish_reason "error": what failed (the log has the traceback)

    @classmethod
    def joined(cls, outputs: list["RequestOutput"]) -> "RequestOutput":
        """One output for consecutive outputs of one request (a drafted step's tokens)."""
        last = outputs[-1]
        return cls(request_id=last.request_id, text="".join(o.text for o in outputs),
                   token_ids=[t for o in outputs for t in o.token_ids], finished=last.finished,
                   finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
                   num_output_tokens=last.num_output_tokens, timings=last.timings,
                   logprobs=[lp for o in outputs for lp in o.logprobs], num_cached_tokens=last.num_cached_tokens)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float        # fraction of KV-cache capacity in use, 0..1
    prefix_cache_hit_rate: float = 0.0   # prompt tokens found in the prefix cache / prompt tokens looked up
