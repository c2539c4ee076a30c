"""POST /v1/chat/completions: messages through the model's chat template, answered whole or
streamed as chat.completion.chunk events."""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from hayate.engine.request import RequestOutput
from hayate.loading.chat_template import ChatTemplateError
from hayate.multimodal.image import ImageLimits, MediaError, check_image_count
from hayate.multimodal.media import MediaPolicy, load_image_url
from hayate.multimodal.prompt import ChatPrompt, PromptTooLong, check_detail, encode_chat
from hayate.server.errors import ERROR_RESPONSES, APIError
from hayate.server.generation import ChoiceRun, ChoiceState, choice_specs
from hayate.server.logprobs import chat_logprobs
from hayate.server.protocol import ChatCompletionRequest, ChatMessage, ContentPart
from hayate.server.responses import (ChatChoice, ChatChunkChoice, ChatCompletion,
                                     ChatCompletionChunk, ChatDelta, ResponseMeta, TextChunks, XGroq,
                                     json_response)
from hayate.server.state import ServedModel, ServerSettings, ServerState, server_state
from hayate.server.streaming import respond
from hayate.server.structured import check_grammar
from hayate.server.tools import ToolDeltas, answer, check_tools
from hayate.tools import ToolPlan, tool_conversation

router = APIRouter(tags=["chat"])
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES,
             summary="Chat completion (streaming with stream=true)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: ServerState = Depends(server_state)) -> Response:
    model = state.require_model(body.model)
    check_chat_request(body, state.settings)
    await check_grammar(body, model)
    tools = await check_tools(body, model)
    prompt = await asyncio.to_thread(encode_messages, model, body.messages, state.settings.media, tools)
    prompt_ids = prompt.token_ids
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    specs = choice_specs(body, model, [prompt_ids], logprobs, prompt_param="messages", images=prompt.images,
                         adjust=tools.apply if tools is not None else None)
    meta = ResponseMeta.new("chatcmpl", model.name)
    run = ChoiceRun(model, state.metrics, meta.id, specs)
    return await respond(request, run, body.stream, lambda: chat_chunks(run, meta, body, model, tools),
                         lambda: json_response(chat_completion(run, meta, body, model, prompt_ids, tools)))


def check_chat_request(body: ChatCompletionRequest, settings: ServerSettings) -> None:
    """Refuse, in one clear line, what hayate cannot do yet rather than silently ignore it."""
    if body.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}, got {body.n}", param="n")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


def encode_messages(model: ServedModel, messages: list[ChatMessage], media: MediaPolicy,
                    tools: ToolPlan | None = None) -> ChatPrompt:
    """Prompt token ids for the conversation, ending with the assistant's turn, and its images
    (fetched and decoded here, within the media policy's limits)."""
    _check_image_parts(model, messages, media.limits)
    conversation = [{"role": "system" if m.role == "developer" else m.role,
                     "content": _message_content(m, index, media), **_tool_fields(m)}
                    for index, m in enumerate(messages)]
    conversation, template_tools = tool_conversation(conversation, model.tool_setup, tools)
    try:
        return encode_chat(conversation, model.chat_template, model.tokenizer, model.processor,
                           max_chars=model.max_prompt_chars, tools=template_tools)
    except PromptTooLong as error:
        raise APIError(400, str(error), param="messages", code="context_length_exceeded") from None
    except ChatTemplateError as error:
        raise APIError(400, str(error), param="messages") from None
    except MediaError as error:
        raise APIError(error.status, str(error), param="messages", code="invalid_image") from None


def _check_image_parts(model: ServedModel, messages: list[ChatMessage], limits: ImageLimits) -> None:
    """Cheap refusals before any image is fetched or decoded."""
    parts = [(index, part_index) for index, m in enumerate(messages) if isinstance(m.content, list)
             for part_index, part in enumerate(m.content) if part.type in IMAGE_PART_TYPES]
    if parts and model.processor is None:
        index, part_index = parts[0]
        raise APIError(400, "this model does not accept images", param=f"messages[{index}].content[{part_index}]",
                       code="image_not_supported")
    try:
        check_image_count(len(parts), limits)
    except MediaError as error:
        raise APIError(error.status, str(error), param="messages", code="too_many_images") from None


def _tool_fields(message: ChatMessage) -> dict:
    """An assistant's calls and a tool result's call id, as chat templates read them."""
    fields = {"tool_calls": [call.model_dump() for call in message.tool_calls]} if message.tool_calls else {}
    if message.role == "tool":
        fields.update(tool_call_id=message.tool_call_id, name=message.name)
    return fields


def _message_content(message: ChatMessage, index: int, media: MediaPolicy) -> str | list[dict]:
    if isinstance(message.content, str):
        return message.content
    if message.content is None:
        if message.role in ("assistant", "tool"):
            return ""
        raise APIError(400, f"a {message.role} message needs content", param=f"messages[{index}].content")
    return [_part(part, f"messages[{index}].content[{part_index}]", media)
            for part_index, part in enumerate(message.content)]


def _part(part: ContentPart, param: str, media: MediaPolicy) -> dict:
    if part.type in IMAGE_PART_TYPES:
        url = image_part_url(part)
        if url is None:
            raise APIError(400, 'an image part needs "image_url": {"url": ...}', param=param)
        detail = image_part_detail(part, param, media.default_detail)   # a bad one before any fetch
        try:
            return {"type": "image", "image": load_image_url(url, media), "detail": detail}
        except MediaError as error:
            raise APIError(error.status, str(error), param=param, code="invalid_image") from None
    if part.type != "text" or part.text is None:
        raise APIError(400, f"content parts must be text or image_url parts, got type {part.type!r}", param=param)
    return {"type": "text", "text": part.text}


def image_part_detail(part: ContentPart, param: str, default: str) -> str:
    """OpenAI chat writes {"image_url": {"url": ..., "detail": ...}}; its Responses API puts
    "detail" beside "image_url". Absent: the server's default (`--image-detail`, auto)."""
    extra = part.model_extra or {}
    nested = extra.get("image_url")
    if isinstance(nested, dict) and "detail" in nested:
        where, detail = f"{param}.image_url.detail", nested["detail"]
    else:
        where, detail = f"{param}.detail", extra.get("detail")
    if detail is None:
        return default
    try:
        return check_detail(detail)
    except MediaError as error:
        raise APIError(400, str(error), param=where) from None


def image_part_url(part: ContentPart) -> str | None:
    """OpenAI chat writes {"image_url": {"url": ...}}; its Responses API {"image_url": "..."}."""
    value = (part.model_extra or {}).get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) and value else None


def chat_completion(run: ChoiceRun, meta: ResponseMeta, body: ChatCompletionRequest,
                    model: ServedModel, prompt_ids: list[int], tools: ToolPlan | None = None) -> ChatCompletion:
    choices = [ChatChoice(index=choice.spec.index, message=message, finish_reason=finish_reason,
                          logprobs=chat_logprobs(model.tokenizer, choice.logprobs) if body.logprobs else None,
                          token_ids=choice.token_ids if body.return_token_ids else None)
               for choice in run.choices
               for message, finish_reason in [answer("".join(choice.text), choice.finish_reason, tools)]]
    return ChatCompletion(**meta.fields(), choices=choices, usage=run.usage(), x_groq=XGroq(id=meta.id),
                          prompt_token_ids=prompt_ids if body.return_token_ids else None)


async def chat_chunks(run: ChoiceRun, meta: ResponseMeta, body: ChatCompletionRequest, model: ServedModel,
                      tools: ToolPlan | None = None) -> AsyncIterator[ChatCompletionChunk | str]:
    """A role chunk per choice, content chunks as tokens come, a finish chunk per choice, and
    (with include_usage) a usage chunk; usage also rides on the last chunk under x_groq.
    Content chunks without logprobs or token ids come as JSON written from a template."""
    opening = [ChatChunkChoice(index=c.spec.index, delta=ChatDelta(role="assistant", content=""))
               for c in run.choices]
    yield ChatCompletionChunk(**meta.fields(), choices=opening, x_groq=XGroq(id=meta.id))
    text_only = not (body.logprobs or body.return_token_ids)
    text_chunk = TextChunks(lambda index, text: ChatCompletionChunk(
        **meta.fields(), choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=text))]))
    calls = {c.spec.index: ToolDeltas(tools) for c in run.choices} if tools is not None and tools.syntax else {}
    async with aclosing(run.events()) as events:
        async for choice, output in events:
            index, finish_reason = choice.spec.index, output.finish_reason
            if calls:
                for position, delta in enumerate(calls[index].feed(output.text)):
                    extra = _extras(output, body, model) if position == 0 else {}
                    yield ChatCompletionChunk(**meta.fields(), choices=[ChatChunkChoice(index=index, delta=delta, **extra)])
            elif text_only and output.text:
                yield text_chunk(index, output.text)
            elif output.text or (output.token_ids and not text_only):
                yield ChatCompletionChunk(**meta.fields(), choices=[_content_choice(choice, output, body, model)])
            if output.finished:
                if calls:
                    deltas, finish_reason = calls[index].finish(finish_reason)
                    for delta in deltas:
                        yield ChatCompletionChunk(**meta.fields(), choices=[ChatChunkChoice(index=index, delta=delta)])
                final = run.done and not body.include_usage
                yield ChatCompletionChunk(
                    **meta.fields(), x_groq=XGroq(id=meta.id, usage=run.usage()) if final else None,
                    choices=[ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason)])
    if body.include_usage:
        usage = run.usage()
        yield ChatCompletionChunk(**meta.fields(), choices=[], usage=usage, x_groq=XGroq(id=meta.id, usage=usage))


def _extras(output: RequestOutput, body: ChatCompletionRequest, model: ServedModel) -> dict:
    """A chunk's logprobs and token ids, when asked for (tool_calls chunks carry them too)."""
    return {"logprobs": chat_logprobs(model.tokenizer, output.logprobs) if body.logprobs else None,
            "token_ids": output.token_ids if body.return_token_ids else None}


def _content_choice(choice: ChoiceState, output: RequestOutput, body: ChatCompletionRequest,
                    model: ServedModel) -> ChatChunkChoice:
    return ChatChunkChoice(index=choice.spec.index, delta=ChatDelta(content=output.text),
                           logprobs=chat_logprobs(model.tokenizer, output.logprobs) if body.logprobs else None,
                           token_ids=output.token_ids if body.return_token_ids else None)
