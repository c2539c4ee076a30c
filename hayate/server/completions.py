"""POST /v1/completions: raw text or token-id prompts, no chat template."""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from hayate.engine.request import RequestOutput
from hayate.multimodal.prompt import PromptTooLong, check_prompt_chars
from hayate.server.errors import ERROR_RESPONSES, APIError
from hayate.server.generation import ChoiceRun, ChoiceState, choice_specs
from hayate.server.logprobs import completion_logprobs
from hayate.server.protocol import CompletionRequest
from hayate.server.responses import Completion, CompletionChoice, ResponseMeta, TextChunks, XGroq, json_response
from hayate.server.state import ServedModel, ServerSettings, ServerState, server_state
from hayate.server.streaming import respond
from hayate.server.structured import check_grammar

router = APIRouter(tags=["completions"])
MAX_PROMPTS = 64   # prompts in one request (each gets n choices)


@router.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES,
             summary="Text completion (streaming with stream=true)")
async def create_completion(body: CompletionRequest, request: Request,
                            state: ServerState = Depends(server_state)) -> Response:
    model = state.require_model(body.model)
    check_completion_request(body, state.settings)
    await check_grammar(body, model)
    prompts = await asyncio.to_thread(encode_prompts, model, body.prompts)
    specs = choice_specs(body, model, prompts, body.logprobs, prompt_param="prompt")
    meta = ResponseMeta.new("cmpl", model.name)
    run = ChoiceRun(model, state.metrics, meta.id, specs)
    return await respond(request, run, body.stream, lambda: completion_chunks(run, meta, body, model),
                         lambda: json_response(completion(run, meta, body, model)))


def check_completion_request(body: CompletionRequest, settings: ServerSettings) -> None:
    if body.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}, got {body.n}", param="n")
    if len(body.prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(body.prompts)}", param="prompt")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of is not supported (leave it unset or equal to n)", param="best_of")
    if body.echo:
        raise APIError(400, "echo is not supported yet", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")


def encode_prompts(model: ServedModel, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each prompt; text gets the model's usual special tokens (BOS)."""
    try:
        for prompt in prompts:
            check_prompt_chars(len(prompt) if isinstance(prompt, str) else 0, model.max_prompt_chars)
    except PromptTooLong as error:
        raise APIError(400, str(error), param="prompt", code="context_length_exceeded") from None
    return [model.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt) for prompt in prompts]


def completion(run: ChoiceRun, meta: ResponseMeta, body: CompletionRequest, model: ServedModel) -> Completion:
    choices = [CompletionChoice(
        index=choice.spec.index, text="".join(choice.text), finish_reason=choice.finish_reason,
        logprobs=completion_logprobs(model.tokenizer, choice.logprobs, 0) if body.logprobs is not None else None,
        token_ids=choice.token_ids if body.return_token_ids else None,
        prompt_token_ids=choice.spec.prompt_ids if body.return_token_ids else None) for choice in run.choices]
    return Completion(**meta.fields(), choices=choices, usage=run.usage(), x_groq=XGroq(id=meta.id))


async def completion_chunks(run: ChoiceRun, meta: ResponseMeta, body: CompletionRequest,
                            model: ServedModel) -> AsyncIterator[Completion | str]:
    """One chunk per engine output that carries something; the finish reason rides on the
    choice's last chunk, usage (x_groq) on the stream's last. Chunks of text alone (no
    logprobs or token ids, not the last) come as JSON written from a template."""
    offsets = [0] * len(run.choices)   # where each choice's next token starts in its text
    text_only = body.logprobs is None and not body.return_token_ids
    text_chunk = TextChunks(lambda index, text: Completion(
        **meta.fields(), choices=[CompletionChoice(index=index, text=text, finish_reason=None)]))
    async with aclosing(run.events()) as events:
        async for choice, output in events:
            if text_only and output.text and not output.finished:
                yield text_chunk(choice.spec.index, output.text)
                continue
            if not (output.text or output.finished or (output.token_ids and not text_only)):
                continue
            final = run.done and not body.include_usage
            yield Completion(**meta.fields(), choices=[_chunk_choice(choice, output, body, model, offsets)],
                             x_groq=XGroq(id=meta.id, usage=run.usage()) if final else None)
    if body.include_usage:
        usage = run.usage()
        yield Completion(**meta.fields(), choices=[], usage=usage, x_groq=XGroq(id=meta.id, usage=usage))


def _chunk_choice(choice: ChoiceState, output: RequestOutput, body: CompletionRequest,
                  model: ServedModel, offsets: list[int]) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(model.tokenizer, output.logprobs, offsets[choice.spec.index])
        offsets[choice.spec.index] += sum(len(token) for token in logprobs.tokens)
    return CompletionChoice(index=choice.spec.index, text=output.text, logprobs=logprobs,
                            finish_reason=output.finish_reason,
                            token_ids=output.token_ids if body.return_token_ids else None)
