"""Response bodies and stream chunks of the OpenAI API, with GroqCloud's timing fields.

`usage` carries OpenAI's token counts plus GroqCloud's queue/prompt/completion/total times
(seconds); streams repeat it under `x_groq.usage`, where GroqCloud clients read it. hayate's
own additions (`image_usage`, `floor_share`) appear only when they apply."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, Field
from starlette.responses import Response

SYSTEM_FINGERPRINT = "fp_hayate"


def _is_none(value: object) -> bool:
    return value is None


@dataclass(frozen=True)
class ResponseMeta:
    """The fields every response and chunk of one request repeats."""
    id: str
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT

    @classmethod
    def new(cls, prefix: str, model: str) -> "ResponseMeta":
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def fields(self) -> dict:
        # A literal, not dataclasses.asdict: this runs for every streamed token, and asdict's
        # recursive copy was a tenth of the event loop's time per token.
        return {"id": self.id, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}


class TextChunks:
    """The JSON of stream chunks that carry only text, from a template pydantic rendered once
    per choice: a token then costs one json.dumps instead of building and serialising three
    models (about a tenth of the event loop's time per streamed token). Equal to
    `render(index, text).model_dump_json()` byte for byte (tests/test_server_api.py checks)."""

    def __init__(self, render: Callable[[int, str], BaseModel]):
        self.render = render
        self.mark = json.dumps(f"hayate-{uuid.uuid4().hex}")
        self.templates: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        template = self.templates.get(index)
        if template is None:
            head, found, tail = self.render(index, json.loads(self.mark)).model_dump_json().partition(self.mark)
            assert found and self.mark not in tail, "the text must appear once in the chunk"
            template = self.templates[index] = (head, tail)
        return template[0] + json.dumps(text, ensure_ascii=False) + template[1]


def json_response(body: BaseModel) -> Response:
    """The body as pydantic writes it (so fields marked exclude_if stay out)."""
    return Response(body.model_dump_json(), media_type="application/json")


class ImageUsage(BaseModel):
    """hayate's breakdown of the time a request's images took before the first token."""
    images: int
    image_tokens: int = Field(description="prompt tokens that stand for the images (their encoder's output rows)")
    decode_time: float = Field(description="seconds reading or fetching, and decoding, the images")
    preprocess_time: float = Field(description="seconds in the image processor (resize, tiles, normalisation)")
    encode_time: float = Field(description="seconds in the vision encoder")
    encoder_cache_hits: int = Field(description="images whose embeddings came from the encoder cache")


class FloorShare(BaseModel):
    """hayate: how close the request ran to `hayate plan`'s floor on this machine (1 = at it)."""
    decode: float | None = Field(description="the floor's seconds for the decode steps (batch 1, bytes and FLOPs "
                                             "at this machine's rates) over the seconds they took")
    prefill: float | None = Field(description="the floor's seconds for prefilling the prompt tokens the prefix "
                                              "cache lacked, over prompt_time")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")
    image_tokens: int | None = Field(None, exclude_if=_is_none, description="prompt tokens that stand for images")


class CompletionTokensDetails(BaseModel):
    """OpenAI's counts of predicted tokens, here speculative decoding's drafts."""
    accepted_prediction_tokens: int = Field(description="drafted tokens the model accepted")
    rejected_prediction_tokens: int = Field(description="drafted tokens it did not")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = Field(None, exclude_if=_is_none)
    queue_time: float = Field(description="seconds waiting for a batch slot")
    prompt_time: float = Field(description="seconds reading the prompt (prefill)")
    completion_time: float = Field(description="seconds generating, after the first token")
    total_time: float = Field(description="prompt_time + completion_time, as GroqCloud counts it")
    image_usage: ImageUsage | None = Field(None, exclude_if=_is_none)
    floor_share: FloorShare | None = Field(None, exclude_if=_is_none)


class XGroq(BaseModel):
    id: str
    usage: Usage | None = Field(None, exclude_if=_is_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments object's JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_is_none)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(None, exclude_if=_is_none, description="hayate: return_token_ids")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_is_none)
    x_groq: XGroq


class ChunkFunction(BaseModel):
    name: str | None = Field(None, exclude_if=_is_none)
    arguments: str


class ChunkToolCall(BaseModel):
    """A call's first delta has id, type and name (arguments ""); later ones argument text only."""
    index: int
    id: str | None = Field(None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(None, exclude_if=_is_none)
    function: ChunkFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)
    tool_calls: list[ChunkToolCall] | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_is_none)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    x_groq: XGroq | None = Field(None, exclude_if=_is_none)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(None, exclude_if=_is_none)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_is_none)


class Completion(BaseModel):
    """Both the whole answer and, with fewer fields filled, each stream chunk (as OpenAI does)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    x_groq: XGroq | None = Field(None, exclude_if=_is_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hayate"
    active: bool = True
    context_window: int = Field(description="tokens, prompt and answer together (GroqCloud field)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    model: str | None = None
    detail: str | None = None
