"""Model output to content and tool calls, in linear time: literals are matched piece by piece,
JSON values are read by the json module's C scanner (`raw_decode`), and a failed call is never
retried from a later position, so no input makes the work grow faster than its length.

The arguments of a call are the exact text the model wrote for them (OpenAI sends arguments as
a JSON string), so the streamed fragments add up to the same string (see stream.py)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hayate.tools.formats import ToolFormat

_WS = re.compile(r"\s*")        # one character class, anchored: no backtracking
JSON_DECODER = json.JSONDecoder()
NO_MATCH, PARTIAL = -1, -2
MAX_CALLS = 128      # calls in one answer; any text after them is content
MAX_MEMBERS = 8      # keys in one call object (name, arguments, and a few a model may add)
FENCE = "```"
FENCE_OPENER = ("```json",)


@dataclass
class ToolCall:
    name: str
    arguments: str      # the arguments object's JSON text, as the model wrote it


@dataclass
class ParsedOutput:
    content: str | None  # None when the answer is only calls (OpenAI's `content: null`)
    calls: list[ToolCall]


def skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def match_loose(text: str, pos: int, pieces: tuple[str, ...]) -> int:
    """End of `pieces` matched at `pos`, any whitespace allowed before each; NO_MATCH, or
    PARTIAL when the text ends while it could still match."""
    for piece in pieces:
        pos = skip_ws(text, pos)
        rest = text[pos:pos + len(piece)]
        if rest != piece:
            return PARTIAL if piece.startswith(rest) and pos + len(rest) == len(text) else NO_MATCH
        pos += len(piece)
    return pos


@dataclass(frozen=True)
class CallSyntax:
    """A format as it reads in decoded text: special tokens that decoding skips are gone, and
    each literal is its non-space pieces (models vary the whitespace around them)."""
    opener: tuple[str, ...]
    separator: tuple[str, ...]
    suffix: tuple[str, ...]
    arguments_keys: tuple[str, ...]
    at_start: bool            # calls open the answer or not at all
    names: frozenset[str] | None = None   # the only names a call may have (None: any)
    fallback: "CallSyntax | None" = None  # another way calls may open the answer

    @classmethod
    def of(cls, tool_format: ToolFormat, hidden_tokens: frozenset[str] = frozenset(),
           names: frozenset[str] | None = None) -> "CallSyntax":
        """With `names` (the request's tools), a format whose calls may follow text also
        takes calls that open the answer as a fenced JSON block (```json ... ```) or one bare
        JSON object, as small models often write them instead of the format's tags. No
        grammar shapes those, so only calls to the named tools, name first, count."""
        def visible(text: str) -> tuple[str, ...]:
            for token in hidden_tokens:
                text = text.replace(token, " ")
            return tuple(text.split())
        at_start = tool_format.at_start or tool_format.trigger in hidden_tokens
        keys = tuple(dict.fromkeys((tool_format.arguments_key, "arguments", "parameters")))
        bare = cls((), (), (), keys, True, names) if names is not None and not at_start else None
        fenced = cls(FENCE_OPENER, (FENCE, *FENCE_OPENER), (FENCE,), keys, True, names, bare) if bare else None
        return cls(visible(tool_format.prefix), visible(tool_format.separator), visible(tool_format.suffix),
                   keys, at_start, None, fenced)

    def opening(self, text: str) -> int:
        """Where the calls open in `text` (the opener's first piece, or the call's brace), or -1."""
        first = self.opener[0] if self.opener else "{"
        if self.at_start:
            start = skip_ws(text, 0)
            return start if text.startswith(first, start) else -1
        return text.find(first)

    def allows(self, name: str) -> bool:
        return self.names is None or name in self.names

    def named_first(self, text: str, pos: int) -> bool:
        """Calls limited to named tools (a fenced block: JSON no grammar shaped) open with
        their name; other JSON there is an answer."""
        return self.names is None or match_loose(text, pos, ("{", '"name"')) >= 0


def parse_output(text: str, syntax: CallSyntax) -> ParsedOutput:
    """Split a finished answer into content and calls; text that is not a well-formed call
    stays content."""
    fallback = syntax.fallback
    while fallback is not None:   # as the stream reads it: the first way the answer opens
        if fallback.opening(text) >= 0:
            return _parse_with(text, fallback)
        fallback = fallback.fallback
    return _parse_with(text, syntax)


def _parse_with(text: str, syntax: CallSyntax) -> ParsedOutput:
    start = syntax.opening(text)
    pos = match_loose(text, start, syntax.opener) if start >= 0 else NO_MATCH
    calls: list[ToolCall] = []
    rest = pos
    while pos >= 0 and len(calls) < MAX_CALLS:
        parsed = parse_call(text, pos, syntax.arguments_keys)
        if parsed is None or not syntax.allows(parsed[0].name) or not syntax.named_first(text, pos):
            break
        calls.append(parsed[0])
        rest = parsed[1]
        pos = match_loose(text, rest, syntax.separator) if syntax.separator else NO_MATCH
    if not calls:
        return ParsedOutput(_content(text), [])
    end = match_loose(text, rest, syntax.suffix)
    before = "" if syntax.at_start else text[:start]   # at_start: only spaces were before
    return ParsedOutput(_content(before + text[end if end >= 0 else rest:]), calls)


def _content(text: str) -> str | None:
    return text if text.strip() else None


def parse_call(text: str, pos: int, arguments_keys: tuple[str, ...]) -> tuple[ToolCall, int] | None:
    """The call object `{"name": ..., "arguments": {...}}` at `pos` (after whitespace) and its end."""
    pos = skip_ws(text, pos)
    if not text.startswith("{", pos):
        return None
    name = arguments = None
    pos = skip_ws(text, pos + 1)
    for _ in range(MAX_MEMBERS):
        member = _member(text, pos)
        if member is None:
            return None
        key, value, value_start, pos = member
        if key == "name" and isinstance(value, str):
            name = value
        elif key in arguments_keys and isinstance(value, dict):
            arguments = text[value_start:pos]
        pos = skip_ws(text, pos)
        if text.startswith("}", pos):
            return (ToolCall(name, arguments), pos + 1) if name is not None and arguments is not None else None
        if not text.startswith(",", pos):
            return None
        pos = skip_ws(text, pos + 1)
    return None


def _member(text: str, pos: int) -> tuple[str, object, int, int] | None:
    """`"key": value` at `pos`: (key, value, where the value starts, where it ends)."""
    if not text.startswith('"', pos):
        return None
    try:
        key, pos = JSON_DECODER.raw_decode(text, pos)
        pos = skip_ws(text, pos)
        if not text.startswith(":", pos):
            return None
        value_start = skip_ws(text, pos + 1)
        value, end = JSON_DECODER.raw_decode(text, value_start)
    except (ValueError, RecursionError):
        return None
    return key, value, value_start, end
