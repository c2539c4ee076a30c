"""LLM: the offline API (generate, chat) that the CLI uses."""
from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence as Seq

import torch

from hayate.config import EngineConfig
from hayate.engine.engine import Engine
from hayate.engine.request import RequestFailedError, RequestOutput, RequestTimings, TokenLogprob
from hayate.loading.builtin_templates import default_chat_template
from hayate.loading.chat_template import ChatTemplate
from hayate.engine.tensor_parallel import threads_per_rank
from hayate.loading.loader import load_model
from hayate.multimodal.features import PromptImages
from hayate.multimodal.prompt import ChatPrompt, encode_chat
from hayate.sampling import SamplingParams
from hayate.tools import ToolCall, ToolPlan, tool_conversation, tool_plan, tool_setup

Prompt = str | list[int]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    timings: RequestTimings
    logprobs: list[TokenLogprob]
    num_cached_tokens: int = 0      # prompt tokens that came from the prefix cache
    tool_calls: list[ToolCall] = field(default_factory=list)   # LLM.chat with tools: the calls made

    @property
    def decode_tokens_per_second(self) -> float | None:
        return decode_rate(len(self.token_ids), self.timings)


def decode_rate(num_output_tokens: int, timings: RequestTimings) -> float | None:
    """Tokens per second after the first one (the first is the prefill's)."""
    if num_output_tokens < 2 or timings.first_token is None or timings.finished is None:
        return None
    return (num_output_tokens - 1) / max(timings.finished - timings.first_token, 1e-9)


class LLM:
    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **settings):
        self.config = config or EngineConfig(model=model, **settings)
        torch.set_num_threads(threads_per_rank(self.config))   # all of them without tensor parallel
        self.loaded = loaded = load_model(self.config)
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.model_config = loaded.config
        self.model_path = loaded.path
        self.chat_template = loaded.chat_template or ChatTemplate(
            default_chat_template(), loaded.tokenizer.bos_token, loaded.tokenizer.eos_token)
        self.engine = Engine(loaded, self.config)
        self.tool_setup = tool_setup(self.config.tool_format, self.chat_template.source, self.tokenizer)
        self._ids = itertools.count()
        # Everything loaded so far lives for the whole run: keep it out of the collector's
        # scans, so collections in the token loop stay short.
        gc.collect()
        gc.freeze()

    def prepare_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                     tools: ToolPlan | None = None) -> ChatPrompt:
        """Token ids and processed images of a conversation; image parts are
        {"type": "image", "image": DecodedImage} (see hayate.multimodal.media). Messages may
        hold tool calls and results in OpenAI's shape."""
        messages, template_tools = tool_conversation(messages, self.tool_setup, tools)
        return encode_chat(messages, self.chat_template, self.tokenizer, self.processor,
                           add_generation_prompt=add_generation_prompt, tools=template_tools)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.prepare_chat(messages, add_generation_prompt).token_ids

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               images: PromptImages | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request as they come; closing the iterator early aborts it."""
        request_id = self._submit(prompt, params, images)
        yield from self._drain(request_id)

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt or a list of prompts (run together, batched); `params` may be a
        list with one SamplingParams per prompt. Constrain an output with
        SamplingParams(grammar=...) (hayate.structured: json_schema, regex, choice, grammar)."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(batch)} prompts")
        ids = [self._submit(prompt, prompt_params) for prompt, prompt_params in zip(batch, per_prompt)]
        results = self._collect(ids)
        return results[0] if single else results

    def chat(self, messages: list[dict], params: SamplingParams | None = None, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None, parallel_tool_calls: bool = True) -> GenerationResult:
        """One answer. With `tools` (OpenAI's shape) and `tool_choice` (none, auto, required, or
        {"type": "function", "function": {"name": ...}}) the calls are enforced by a grammar and
        parsed: `tool_calls` holds them and finish_reason is "tool_calls"."""
        plan = self.tool_plan(tools, tool_choice, parallel_tool_calls)
        prompt = self.prepare_chat(messages, tools=plan)
        params = plan.apply(params or SamplingParams()) if plan is not None else params
        result = self._collect([self._submit(prompt.token_ids, params, prompt.images)])[0]
        parsed = plan.calls_in(result.text, result.finish_reason) if plan is not None else None
        return replace(result, tool_calls=parsed.calls, finish_reason="tool_calls") if parsed else result

    def tool_plan(self, tools: list[dict] | None, tool_choice: str | dict | None = None,
                  parallel_tool_calls: bool = True) -> ToolPlan | None:
        """What tools and tool_choice make of a chat request (None without tools); ValueError if bad."""
        return tool_plan(self.tool_setup, tools, tool_choice, parallel_tool_calls)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        prompt = self.prepare_chat(messages)   # errors raise here, before any iteration
        return self.stream(prompt.token_ids, params, prompt.images)

    def _submit(self, prompt: Prompt, params: SamplingParams | None, images: PromptImages | None = None) -> str:
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = f"req-{next(self._ids)}"
        self.engine.add_request(request_id, token_ids, params or SamplingParams(), images)
        return request_id

    def _drain(self, request_id: str) -> Iterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        finished = output.finished
                        if output.finish_reason == "error":
                            raise RequestFailedError.of(output)
                        yield output
        finally:
            if not finished:
                self.engine.abort_request(request_id)

    def _collect(self, request_ids: list[str]) -> list[GenerationResult]:
        parts: dict[str, list[RequestOutput]] = {request_id: [] for request_id in request_ids}
        try:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    parts[output.request_id].append(output)
        finally:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
        failed = [parts[request_id][-1] for request_id in request_ids if parts[request_id][-1].finish_reason == "error"]
        if failed:
            raise RequestFailedError.of(failed[0])
        return [_result(parts[request_id]) for request_id in request_ids]


def _result(outputs: list[RequestOutput]) -> GenerationResult:
    last = outputs[-1]
    return GenerationResult(
        text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
        timings=last.timings, logprobs=[lp for o in outputs for lp in o.logprobs],
        num_cached_tokens=last.num_cached_tokens)
