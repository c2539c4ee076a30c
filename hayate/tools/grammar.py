"""Tool-call grammars in llguidance's Lark dialect, from a format, the tools and tool_choice.

- required: the answer is calls (one, or several with parallel_tool_calls), each
  `{"name": <one of the tools>, "arguments": <valid against that tool's schema>}`;
- named: the same with that one tool;
- auto: free text, and once the format's trigger appears (a special token, or text matched
  lazily) the rest must be calls; formats whose calls open the answer (`at_start`) take text
  that does not start with a brace instead.
Special tokens of the format are written `<[id]>` (llguidance refuses them as string literals)."""
from __future__ import annotations

import json
import re

from hayate.structured.backend import JSON_OPTIONS   # JSON as json.dumps writes it, never free whitespace
from hayate.tools.formats import ToolFormat

TEXT = r"/(.|\n)*/"
_DEFS = ("$defs", "definitions")


def call_schema(name: str, parameters: dict, arguments_key: str, strict: bool) -> dict:
    """One call's JSON schema: the name fixed, the arguments the tool's parameters. Their
    definitions move to the root, where `#/$defs/...` references point."""
    arguments = {key: value for key, value in parameters.items() if key not in _DEFS}
    schema = {"type": "object",
              "properties": {"name": {"const": name}, arguments_key: _rebased(arguments)},
              "required": ["name", arguments_key], "additionalProperties": False}
    schema.update({key: parameters[key] for key in _DEFS if key in parameters})
    schema["x-guidance"] = JSON_OPTIONS if strict else {**JSON_OPTIONS, "lenient": True}
    return schema


def _rebased(node: object) -> object:
    """References into the parameters schema itself (`#`, `#/properties/...`) now point below
    the call's `arguments`; references to definitions stay at the root."""
    if isinstance(node, list):
        return [_rebased(item) for item in node]
    if not isinstance(node, dict):
        return node
    rebased = {key: _rebased(value) for key, value in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and not ref.startswith(("#/$defs/", "#/definitions/")):
        rebased["$ref"] = "#/properties/arguments" + ref[1:]
    return rebased


def literal(text: str, tool_format: ToolFormat, token_ids: dict[str, int]) -> str:
    """Lark for literal text: the format's special tokens found in the vocabulary as `<[id]>`,
    the rest as quoted strings."""
    parts: list[str] = []
    while text:
        token = min(((text.find(t), t) for t in tool_format.tokens if t in token_ids and t in text),
                    default=None)
        if token is None:
            parts.append(json.dumps(text, ensure_ascii=False))
            break
        index, name = token
        if index:
            parts.append(json.dumps(text[:index], ensure_ascii=False))
        parts.append(f"<[{token_ids[name]}]>")
        text = text[index + len(name):]
    return " ".join(parts) if parts else '""'


def tool_grammar(tool_format: ToolFormat, tools: list[tuple[str, dict, bool]], mode: str, parallel: bool,
                 token_ids: dict[str, int]) -> str:
    """Lark source for `tools` ((name, parameters, strict) each) under mode "required" or
    "auto" (a named choice is "required" with one tool)."""
    lit = lambda text: literal(text, tool_format, token_ids)   # noqa: E731
    rules = [f"call_{i}: %json {json.dumps(call_schema(name, params, tool_format.arguments_key, strict))}"
             for i, (name, params, strict) in enumerate(tools)]
    rules.insert(0, "call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    more = f" ({lit(tool_format.separator)} call)*" if parallel and tool_format.separator else ""
    body = f"call{more} {lit(tool_format.suffix)}" if tool_format.suffix else f"call{more}"
    if tool_format.trailing:   # optional: a model that stops right after the suffix may
        body += f" ({lit(tool_format.trailing)})?"
    if mode == "required":
        start = [f"start: {lit(tool_format.prefix)} {body}" if tool_format.prefix else f"start: {body}"]
    else:
        start = _auto_start(tool_format, body, lit, token_ids)
    return "\n".join(["%llguidance {}", *start, *rules]) + "\n"


def _auto_start(tool_format: ToolFormat, body: str, lit, token_ids: dict[str, int]) -> list[str]:
    prefix, trigger = tool_format.prefix, tool_format.trigger
    rest = prefix[len(trigger):]
    calls = f"{lit(rest)} {body}" if rest else body
    is_token = trigger in tool_format.tokens and trigger in token_ids
    if tool_format.at_start:
        opening = f"{lit(prefix)} {body}" if prefix else body
        return ["start: TEXT | calls", f"calls: {opening}", f"TEXT: {TEXT if is_token else _text_not_opening(prefix)}"]
    if is_token:
        # text can never contain a special token: the token itself is the trigger
        return [f"start: TEXT | TEXT {lit(trigger)} calls", f"calls: {calls}", f"TEXT: {TEXT}"]
    return ["start: TEXT | opening calls", f"opening[lazy]: TEXT {json.dumps(trigger)}",
            f"calls: {calls}", f"TEXT: {TEXT}"]


def _text_not_opening(prefix: str) -> str:
    """Text that does not open (after spaces) the way calls do, for formats whose calls open
    the answer: such text is free, and the rest is calls."""
    first = re.escape((prefix or "{")[0])
    return rf"/(\s*[^{first}\s](.|\n)*)?/"
