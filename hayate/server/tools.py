"""Tools at the edge of the chat endpoint: a request's tools and tool_choice checked and
compiled before it is admitted (a bad schema is a 400 naming the tool before any token), and
the output turned into `message.tool_calls` or streamed tool_calls deltas.

finish_reason is "tool_calls" when the answer ended on its own ("stop") with calls; a cut
answer ("length") presents no call as complete: whole answers then carry the raw text as
content and no tool_calls (streams have sent what came, and end with "length")."""
from __future__ import annotations

import asyncio

from hayate.server.errors import APIError
from hayate.server.protocol import ChatCompletionRequest
from hayate.server.responses import (AssistantMessage, ChatDelta, ChunkFunction, ChunkToolCall, FunctionCall,
                                     ToolCall)
from hayate.server.state import ServedModel
from hayate.structured.spec import GrammarError, GrammarSpec
from hayate.tools import (CallDelta, ToolCallStream, ToolPlan, ToolRequestError, new_call_id, parse_tool_choice,
                          parse_tools, plan_tools)
from hayate.tools.request import bad_tool, grammar_source


async def check_tools(body: ChatCompletionRequest, model: ServedModel) -> ToolPlan | None:
    """The request's tool plan (None without tools); APIError 400 naming the field for bad
    tools or tool_choice."""
    if body.functions:
        raise APIError(400, "functions is deprecated and not supported; send tools instead", param="functions")
    try:
        tools = parse_tools([tool.model_dump(exclude_none=True) for tool in body.tools or ()])
        choice_value = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        plan = plan_tools(model.tool_setup, tools, parse_tool_choice(choice_value, tools), body.parallel_tool_calls)
    except ToolRequestError as error:
        raise APIError(400, str(error), param=error.param) from None
    if plan is None:
        return None
    grammar_field = body.grammar_field() if plan.grammar is not None else None
    if grammar_field is not None:
        raise APIError(400, f"{grammar_field} cannot be combined with tools unless tool_choice is none",
                       param=grammar_field)
    await asyncio.to_thread(_compile, model, plan)
    return plan


def _compile(model: ServedModel, plan: ToolPlan) -> None:
    """Compile the tools' grammar (cached for the engine); on refusal, find the tool to blame."""
    compile_grammar = model.engine.engine.compile_grammar
    spec = plan.grammar or GrammarSpec("lark", grammar_source(model.tool_setup, plan.tools, "required", False))
    try:
        compile_grammar(spec)
    except GrammarError as error:
        blamed = bad_tool(model.tool_setup, plan.tools, compile_grammar)
        if blamed is not None:
            raise APIError(400, str(blamed), param=blamed.param) from None
        raise APIError(400, f"tools: {error}", param="tools") from None


def answer(text: str, finish_reason: str | None, plan: ToolPlan | None) -> tuple[AssistantMessage, str | None]:
    """A whole answer's message and finish_reason."""
    parsed = plan.calls_in(text, finish_reason) if plan is not None else None
    if parsed is None:
        return AssistantMessage(content=text), finish_reason
    calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
             for call in parsed.calls]
    return AssistantMessage(content=parsed.content, tool_calls=calls), "tool_calls"


class ToolDeltas:
    """One choice's streamed text as content and tool_calls deltas."""

    def __init__(self, plan: ToolPlan):
        self.stream = ToolCallStream(plan.syntax)

    def feed(self, text: str) -> list[ChatDelta]:
        return _deltas(self.stream.feed(text))

    def finish(self, finish_reason: str | None) -> tuple[list[ChatDelta], str | None]:
        """The held-back text's deltas, and the finish_reason to send."""
        deltas = _deltas(self.stream.finish())
        made_calls = bool(self.stream.calls) and not self.stream.truncated
        return deltas, "tool_calls" if finish_reason == "stop" and made_calls else finish_reason


def _deltas(delta) -> list[ChatDelta]:
    """Content first, then one delta per call piece (as OpenAI streams them)."""
    deltas = [ChatDelta(content=delta.content)] if delta.content else []
    return deltas + [ChatDelta(tool_calls=[_chunk_call(call)]) for call in delta.calls]


def _chunk_call(call: CallDelta) -> ChunkToolCall:
    if call.id is None:
        return ChunkToolCall(index=call.index, function=ChunkFunction(arguments=call.arguments))
    return ChunkToolCall(index=call.index, id=call.id, type="function",
                         function=ChunkFunction(name=call.name, arguments=call.arguments))
