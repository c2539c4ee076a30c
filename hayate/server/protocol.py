"""Request bodies of the OpenAI API as hayate accepts them (pydantic, validated strictly).

Strict mode: "2" is not a number and 1 is not true, as OpenAI's own API answers. Unknown
fields are ignored, since clients (LangChain, SDKs) send extras that change nothing here;
fields that would change the answer but are not supported yet are declared and refused."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hayate.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from hayate.structured import GrammarError, GrammarSpec
from hayate.structured.requests import from_guided, from_response_format, from_structured_outputs

MAX_MESSAGES = 2048        # OpenAI's limit on one conversation
MAX_CONTENT_PARTS = 1024   # parts in one message's content
MAX_TOOLS = 128            # GroqCloud's limit on one request's tools


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _at_most(value: Any, limit: int, what: str) -> Any:
    """Refuse a list or dict longer than `limit` before its items are validated one by one."""
    if isinstance(value, (list, dict)) and len(value) > limit:
        raise ValueError(f"at most {limit} {what}, got {len(value)}")
    return value


def _either(value: Any, handler, description: str) -> Any:
    """Run pydantic's union check, but say in one line what the field accepts."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be {description}") from None


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """What chat and text completions share: the model, sampling and output options."""
    model: str
    n: int = Field(1, ge=1, le=128, description="choices to generate (up to the server's limit)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1; 0 = greedy")
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="with n > 1, choice i uses seed + i")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # hayate extensions
    top_k: int | None = Field(None, description="hayate: keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, description="hayate: drop tokens below min_p x the top probability")
    repetition_penalty: float | None = Field(None, description="hayate: HF-style, over prompt and output")
    ignore_eos: bool = Field(False, description="hayate: keep going past end-of-sequence tokens")
    speculative: str | None = Field(None, description='hayate: "ngram" (prompt lookup), "draft" (the '
                                    "server's draft model) or \"off\"; default: the server's --speculative")
    speculative_tokens: int | None = Field(None, description="hayate: most tokens drafted a step")
    speculative_ngram: int | None = Field(None, description="hayate: tokens a draft's match starts from")
    return_token_ids: bool = Field(False, description="hayate: add prompt and choice token ids")
    # structured output (enforced by the grammar engine): OpenAI's field, vLLM's, vLLM's older ones
    response_format: dict | None = Field(None, description='{"type": "text" | "json_object" | "json_schema", '
                                                           '"json_schema": {"name", "schema", "strict"}}')
    structured_outputs: dict | None = Field(None, description="vLLM: exactly one of json, regex, choice, "
                                                              "grammar (Lark or GBNF), json_object")
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler) -> Any:
        return _either(value, handler, "a string or a list of strings")

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        return _at_most(value, MAX_LOGIT_BIAS, "entries")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @classmethod
    def field_named(cls, message: str) -> str | None:
        """The request field an error message starts with ("top_p must be in ...",
        "logit_bias[5] ...", "response_format: ..."), or None."""
        name = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
        return name if name in cls.model_fields else None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        """Engine parameters for choice `index`; raises ValueError naming the bad field."""
        return SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs,
            temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0),
            top_k=_or(self.top_k, 0), min_p=_or(self.min_p, 0.0),
            repetition_penalty=_or(self.repetition_penalty, 1.0),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            seed=None if self.seed is None else self.seed + index,
            stop=_or(self.stop, []), ignore_eos=self.ignore_eos,
            logit_bias=_or(self.logit_bias, {}), grammar=self.grammar(), speculative=self.speculative,
            speculative_tokens=self.speculative_tokens, speculative_ngram=self.speculative_ngram)

    def grammar_field(self) -> str | None:
        """The one field that asks for structured output, if any; GrammarError if several do."""
        guided = [name for name in GUIDED_FIELDS if getattr(self, name) is not None]
        fields = [name for name, given in (("response_format", from_response_format(self.response_format)),
                                           ("structured_outputs", self.structured_outputs)) if given is not None]
        fields += guided[:1]
        if len(fields) > 1:
            raise GrammarError(f"{fields[1]} cannot be combined with {fields[0]}")
        return fields[0] if fields else None

    def grammar(self) -> GrammarSpec | None:
        """The output's grammar from the request's fields; GrammarError (naming the field) if bad."""
        name = self.grammar_field()
        if name == "response_format":
            return from_response_format(self.response_format)
        if name == "structured_outputs":
            return from_structured_outputs(self.structured_outputs)
        return from_guided({field: getattr(self, field) for field in GUIDED_FIELDS})


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read (checked in chat.py)."""
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class FunctionDefinition(StrictModel):
    name: str
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of an object; default: no arguments")
    strict: bool | None = None


class ToolParam(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(StrictModel):
    name: str
    arguments: str | dict = Field(description="a JSON object's text, as OpenAI sends it (an object also works)")


class MessageToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = Field(None, description="in a tool message: the call it answers")

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler) -> Any:
        _at_most(value, MAX_CONTENT_PARTS, "content parts")
        return _either(value, handler, 'a string or a list of {"type": "text", "text": ...} parts')


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="preferred over max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = Field(True, description="false: at most one call per answer")
    # Declared so it can be refused clearly rather than silently ignored.
    functions: list[dict] | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        return _at_most(value, MAX_TOOLS, "tools")

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice(cls, value: Any, handler) -> Any:
        return _either(value, handler, 'none, auto, required or {"type": "function", "function": {"name": ...}}')

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> Any:
        return _at_most(value, MAX_MESSAGES, "messages")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="text, token ids, or a list of either (one choice set each)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler) -> Any:
        return _either(value, handler, "a string, a list of token ids, or a list of either")

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt) or [[]]
