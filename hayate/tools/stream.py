"""Streamed model output to OpenAI chat deltas: content before the calls, then per call index
one delta with its id, type and name (arguments ""), then the argument text as it comes.

Each piece of text is read once: a brace-depth scanner follows the JSON across chunk ends, and
only a short head (`{"name": "...", "arguments": `) is re-read, up to HEAD_LIMIT characters.
A call whose head is not canonical is sent whole once its object closes."""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from hayate.tools.parser import (JSON_DECODER, MAX_CALLS, NO_MATCH, PARTIAL, CallSyntax, ToolCall, match_loose,
                                 parse_call, skip_ws)

HEAD_LIMIT = 1024   # characters of a call read again and again while waiting for its name
HOLD_LIMIT = 256    # characters held back while a literal (opener, separator) may still match
SEEK, OPEN, HEAD, ARGS, TAIL, BETWEEN, AFTER, CONTENT = range(8)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    index: int
    arguments: str
    id: str | None = None     # id, type and name come once, in a call's first delta
    name: str | None = None


@dataclass
class StreamDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


class _Depth:
    """Brace depth of JSON text read in chunks; strings and escapes are followed across ends."""
    _OUTSIDE = re.compile(r'[{\[]+|[}\]"]')   # a run of openers at once
    _INSIDE = re.compile(r'[\\"]')

    def __init__(self, depth: int = 0):
        self.depth, self.in_string, self.escape = depth, False, False

    def scan(self, text: str, pos: int = 0) -> int:
        """Read text[pos:]; the index just past the character that brings the depth to 0, or -1."""
        if self.escape and pos < len(text):
            self.escape, pos = False, pos + 1
        while True:
            found = (self._INSIDE if self.in_string else self._OUTSIDE).search(text, pos)
            if found is None:
                return -1
            char, pos = found.group(), found.end()
            if char == "\\":
                if pos == len(text):
                    self.escape = True
                    return -1
                pos += 1
            elif char == '"':
                self.in_string = not self.in_string
            elif char[0] in "{[":
                self.depth += len(char)
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return pos


class ToolCallStream:
    """Feed text deltas; get StreamDelta back. `finish()` releases held text at the end."""

    def __init__(self, syntax: CallSyntax):
        self.syntax = syntax
        self.fallback = syntax.fallback   # until the answer's start has passed
        self.state = SEEK
        self.held = ""            # text waiting for a decision (at most about HOLD_LIMIT characters)
        self.segment = ""         # the opener or separator before the current call
        self.call_parts: list[str] = []   # a call's text while its head is awaited
        self.call_chars = 0
        self.scanner = _Depth()
        self.calls: list[ToolCall] = []
        self.name, self.arguments, self.started = "", [], False
        self.out = StreamDelta()

    @property
    def truncated(self) -> bool:
        """The text ended inside a call."""
        return self.state in (ARGS, TAIL)

    def feed(self, text: str) -> StreamDelta:
        self.out = StreamDelta()
        handlers = {SEEK: self._seek, OPEN: self._open, HEAD: self._head, ARGS: self._args,
                    TAIL: self._tail, BETWEEN: self._between, AFTER: self._after, CONTENT: self._content}
        while text:
            text = handlers[self.state](text) or ""
        return self.out

    def finish(self) -> StreamDelta:
        self.out = StreamDelta()
        if self.state == BETWEEN:
            end = match_loose(self.held, 0, self.syntax.suffix)
            rest = self.held[end:] if end >= 0 else self.held
            self._content("" if end >= 0 and rest.isspace() else rest)   # spaces after the calls: none
        elif self.state == HEAD:
            self._content(self.segment + "".join(self.call_parts))
        elif self.state in (SEEK, OPEN):
            self._content(self.held)
        # AFTER: only spaces followed the calls; they are no content
        self.held, self.state = "", CONTENT
        return self.out

    def _content(self, text: str) -> None:
        self.out.content += text

    def _hold(self, held: str) -> str | None:
        """Wait for more text, unless too much is waiting already: then it is content."""
        if len(held) <= HOLD_LIMIT:
            self.held = held
            return None
        self.held, self.state = "", CONTENT
        return held

    def _seek(self, text: str) -> str | None:
        held = self.held + text
        stripped = held.lstrip()
        while self.fallback is not None:   # the answer's start: a fallback's opener may come
            first = self.fallback.opener[0] if self.fallback.opener else "{"
            if stripped.startswith(first):
                self.syntax, self.fallback = self.fallback, None
            elif first.startswith(stripped):
                return self._hold(held)
            else:
                self.fallback = self.fallback.fallback
        start = self.syntax.opening(held)
        if start >= 0:
            self._content("" if self.syntax.at_start else held[:start])   # at_start: only spaces before
            self.held, self.state = "", OPEN
            return held[start:]
        first = self.syntax.opener[0] if self.syntax.opener else "{"
        if self.syntax.at_start:
            stripped = held.lstrip()
            if stripped and not first.startswith(stripped):
                self.held, self.state = "", CONTENT
                return held
            return self._hold(held)
        keep = next((k for k in range(min(len(first) - 1, len(held)), 0, -1) if held.endswith(first[:k])), 0)
        self._content(held[:len(held) - keep])
        self.held = held[len(held) - keep:]
        return None

    def _open(self, text: str) -> str | None:
        held = self.held + text
        return self._enter_call(held, match_loose(held, 0, self.syntax.opener))

    def _between(self, text: str) -> str | None:
        held = self.held + text
        end = match_loose(held, 0, self.syntax.separator) if self.syntax.separator else NO_MATCH
        if end != NO_MATCH:
            return self._enter_call(held, end)
        closed = match_loose(held, 0, self.syntax.suffix)
        if closed == PARTIAL:
            return self._hold(held)
        self.held, self.state = "", AFTER if closed >= 0 else CONTENT
        return held[closed:] if closed >= 0 else held

    def _after(self, text: str) -> str | None:
        """Text after the calls: held while it is only spaces (a newline models end with)."""
        held = self.held + text
        if held.isspace():
            return self._hold(held)
        self.held, self.state = "", CONTENT
        return held

    def _enter_call(self, held: str, end: int) -> str | None:
        """After an opener or separator that ends at `end`: the call object must follow."""
        start = skip_ws(held, end) if end >= 0 else end
        if end == PARTIAL or start == len(held):
            return self._hold(held)
        if start < 0 or not held.startswith("{", start) or len(self.calls) >= MAX_CALLS:
            self.held, self.state = "", CONTENT   # not a call after all: the rest is content
            return held
        self.segment, self.held = held[:start], ""
        self.state, self.scanner, self.started = HEAD, _Depth(), False
        self.call_parts, self.call_chars = [], 0
        return held[start:]

    def _head(self, text: str) -> str | None:
        """Keep the call's text until its name and the start of its arguments are known."""
        done = self.scanner.scan(text)
        part = text if done < 0 else text[:done]
        self.call_parts.append(part)
        self.call_chars += len(part)
        if self.call_chars <= HEAD_LIMIT:
            head_text = "".join(self.call_parts)
            head = _canonical_head(head_text, self.syntax.arguments_keys)
            if (head is not None and not self.syntax.allows(head[0])) or not self._named_first(head_text):
                self._content(self.segment + head_text)   # not a call after all: content
                self.state = CONTENT
                return text[done:] if done >= 0 else None
            if head is not None:
                self._start_call(head[0])
                self.state, self.scanner = ARGS, _Depth()
                rest = self._args(head_text[head[1]:])   # the call so far, from its arguments on
                return (rest or "") + text[done:] if done >= 0 else rest
        if done < 0:
            return None
        self._whole_call("".join(self.call_parts))
        return text[done:]

    def _args(self, text: str) -> str | None:
        done = self.scanner.scan(text)
        self._arguments(text if done < 0 else text[:done])
        if done < 0:
            return None
        self.state, self.scanner = TAIL, _Depth(1)
        return text[done:]

    def _tail(self, text: str) -> str | None:
        done = self.scanner.scan(text)
        if done < 0:
            return None
        self.calls.append(ToolCall(self.name, "".join(self.arguments)))
        self.state, self.held = BETWEEN, ""
        return text[done:]

    def _whole_call(self, text: str) -> None:
        parsed = parse_call(text, 0, self.syntax.arguments_keys)
        if parsed is None or not self.syntax.allows(parsed[0].name):
            self._content(self.segment + text)
            self.state = CONTENT
            return
        self._start_call(parsed[0].name)
        self._arguments(parsed[0].arguments)
        self.calls.append(parsed[0])
        self.held, self.state = "", BETWEEN

    def _named_first(self, head_text: str) -> bool:
        """Whether the head may still open with the call's name where calls must (a fenced
        block): other JSON is an answer, sent on at once."""
        return self.syntax.names is None or match_loose(head_text, 0, ("{", '"name"')) != NO_MATCH

    def _start_call(self, name: str) -> None:
        self.name, self.arguments, self.started = name, [], True
        self.out.calls.append(CallDelta(len(self.calls), "", id=new_call_id(), name=name))

    def _arguments(self, text: str) -> None:
        if text:
            self.arguments.append(text)
            self.out.calls.append(CallDelta(len(self.calls), text))


def _canonical_head(text: str, arguments_keys: tuple[str, ...]) -> tuple[str, int] | None:
    """`{"name": "<name>", "<arguments key>": ` then `{`: (name, where the arguments start)."""
    pos = match_loose(text, 0, ("{", '"name"', ":"))
    if pos < 0:
        return None
    try:
        name, pos = JSON_DECODER.raw_decode(text, skip_ws(text, pos))
    except ValueError:
        return None
    for key in arguments_keys:
        end = match_loose(text, pos, (",", f'"{key}"', ":"))
        if end >= 0:
            start = skip_ws(text, end)
            return (name, start) if isinstance(name, str) and text.startswith("{", start) else None
    return None
