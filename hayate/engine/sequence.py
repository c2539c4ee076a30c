"""One request inside the engine: its tokens, KV blocks, sampling and text state."""
from __future__ import annotations

from dataclasses import dataclass, field

from hayate.engine.images import RequestImages
from hayate.engine.request import RequestStatus, RequestTimings
from hayate.engine.speculative import Speculation
from hayate.layers.sampler import SamplingState
from hayate.loading.tokenizer import IncrementalDetokenizer
from hayate.sampling import StopStringMatcher


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    timings: RequestTimings
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)   # KV-cache blocks, in order
    block_hashes: list[int] = field(default_factory=list)  # prefix hash after each full block
    num_computed_tokens: int = 0          # tokens whose keys/values are in the KV cache
    num_cached_tokens: int = 0            # prompt tokens found in the prefix cache
    cache_prefix: bool = True             # False for prompts with images (their tokens do not name them)
    finish_reason: str | None = None
    emitted_text: list[str] = field(default_factory=list)
    images: RequestImages | None = None   # a vision model's images, spliced in at prefill
    speculation: Speculation | None = None   # drafting state, for a request that speculates

    @property
    def output_token_ids(self) -> list[int]:
        return self.sampling.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, count: int) -> list[int]:
        """Tokens start .. start + count of prompt followed by output."""
        prompt, output = self.prompt_token_ids, self.output_token_ids
        if start >= len(prompt):
            return output[start - len(prompt):start - len(prompt) + count]
        if start + count <= len(prompt):
            return prompt[start:start + count]
        return prompt[start:] + output[:start + count - len(prompt)]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
