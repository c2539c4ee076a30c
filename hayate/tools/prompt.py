"""A conversation with tool calls and tool results, as the chat template takes it.

Templates with tool support get `tools`, assistant `tool_calls` with their arguments as
mappings (clients send JSON strings; templates that `tojson` them would double-encode), and
`role: tool` messages. For templates without (the polyfill), hayate describes the tools in a
system message and writes past calls and results as text in the format the model answers in."""
from __future__ import annotations

import json

from hayate.tools.formats import ToolSetup
from hayate.tools.request import Tool, ToolPlan

POLYFILL_INTRO = "You can call these tools; each line is one tool's name, description and JSON schema:"
POLYFILL_HOW = "To call tools, answer with only this, filling in each call's name and arguments:"


def tool_conversation(messages: list[dict], setup: ToolSetup, plan: ToolPlan | None) -> tuple[list[dict], list[dict] | None]:
    """The messages and the `tools` to render the template with."""
    offered = plan.tools if plan is not None and plan.choice.mode != "none" else None
    return template_messages(messages, setup, offered), plan.template_tools if plan is not None else None


def template_messages(messages: list[dict], setup: ToolSetup, offered: list[Tool] | None) -> list[dict]:
    """Messages (dicts with role, content, tool_calls, tool_call_id) ready for the template;
    `offered`: the tools shown to the model when the template cannot show them itself."""
    names = _call_names(messages)
    if setup.native:
        converted = [_native(message, names) for message in messages]
    else:
        converted = [_polyfilled(message, setup, names) for message in messages]
    if offered and not setup.native:
        converted = _with_tool_system(converted, _tools_text(setup, offered))
    return converted


def arguments_object(arguments: object) -> object:
    """A call's arguments as a mapping when they are a JSON object's text; as sent otherwise."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


def _call_names(messages: list[dict]) -> dict[str, str]:
    """Function name of each earlier call by id, for tool results that only carry the id."""
    return {call.get("id"): call.get("function", {}).get("name")
            for message in messages for call in message.get("tool_calls") or ()}


def _native(message: dict, names: dict[str, str]) -> dict:
    if message.get("tool_calls"):
        calls = [{**call, "type": "function",
                  "function": {**call["function"], "arguments": arguments_object(call["function"].get("arguments"))}}
                 for call in message["tool_calls"]]
        return {**message, "content": message.get("content") or "", "tool_calls": calls}
    if message.get("role") == "tool":
        name = message.get("name") or names.get(message.get("tool_call_id"))
        return {**message, "content": message.get("content") or "", **({"name": name} if name else {})}
    return message


def _polyfilled(message: dict, setup: ToolSetup, names: dict[str, str]) -> dict:
    if message.get("tool_calls"):
        calls = [(call["function"]["name"], arguments_object(call["function"].get("arguments")))
                 for call in message["tool_calls"]]
        text = "\n".join(part for part in (_text(message.get("content")), setup.format.render(calls)) if part)
        return {"role": "assistant", "content": text}
    if message.get("role") == "tool":
        name = message.get("name") or names.get(message.get("tool_call_id"))
        result = {"tool_response": {"name": name, "content": _text(message.get("content"))}}
        return {"role": "user", "content": json.dumps(result, ensure_ascii=False)}
    return message


def _text(content: object) -> str:
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _tools_text(setup: ToolSetup, tools: list[Tool]) -> str:
    lines = [json.dumps({"name": tool.name, "description": tool.description or "", "parameters": tool.parameters},
                        ensure_ascii=False) for tool in tools]
    example = setup.format.render([("<tool name>", {"<argument>": "<value>"})])
    return "\n".join([POLYFILL_INTRO, *lines, "", POLYFILL_HOW, example])


def _with_tool_system(messages: list[dict], tools_text: str) -> list[dict]:
    """The tools' description appended to the system message, or in one of its own first."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{tools_text}"}, *messages[1:]]
    return [{"role": "system", "content": tools_text}, *messages]
