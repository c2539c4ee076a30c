"""Size and shape limits on grammars, checked before any compiling: a hostile request is
refused in microseconds, not after the compiler has spent its fuel."""
from __future__ import annotations

import json

from hayate.structured.spec import GrammarError, GrammarSpec

MAX_SOURCE_CHARS = 64 * 1024     # a JSON schema or a Lark grammar
MAX_REGEX_CHARS = 4096
MAX_NESTING = 32                 # levels of objects / arrays in a schema
MAX_ENUM_VALUES = 1024           # in one enum (or choice list)
MAX_TOTAL_ENUM_VALUES = 4096     # in all of a schema's enums together
MAX_CHOICE_CHARS = 1024          # one choice string
MAX_NESTED_REPEATS = 100_000     # product of counted repetitions nested in a regex: (a{1000}){1000}


def check_spec(spec: GrammarSpec) -> None:
    """Raise GrammarError naming the limit a spec is past, or its malformed part."""
    limit = MAX_REGEX_CHARS if spec.kind == "regex" else MAX_SOURCE_CHARS
    if len(spec.source) > limit:
        raise GrammarError(f"the {_what(spec.kind)} has {len(spec.source)} characters; the limit is {limit}")
    if spec.kind == "json_schema":
        check_schema(_loaded(spec.source, "JSON schema"))
    elif spec.kind == "choice":
        check_choices(_loaded(spec.source, "choice list"))
    elif spec.kind == "regex":
        check_regex(spec.source)
    elif spec.kind == "lark" and not spec.source.strip():
        raise GrammarError("the grammar is empty")


def check_schema(schema: object) -> None:
    """A JSON schema is an object (or a boolean), nested at most MAX_NESTING deep, with enums
    of at most MAX_ENUM_VALUES values each and MAX_TOTAL_ENUM_VALUES in all."""
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    total = 0
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise GrammarError(f"the JSON schema is nested more than {MAX_NESTING} levels deep")
        if isinstance(node, dict):
            enum = node.get("enum")
            if isinstance(enum, list):
                if len(enum) > MAX_ENUM_VALUES:
                    raise GrammarError(f"an enum has {len(enum)} values; the limit is {MAX_ENUM_VALUES}")
                total += len(enum)
            if isinstance(node.get("pattern"), str):
                check_regex(node["pattern"])
            stack += [(value, depth + 1) for key, value in node.items() if key not in ("enum", "const")]
        elif isinstance(node, list):
            stack += [(value, depth + 1) for value in node]
    if total > MAX_TOTAL_ENUM_VALUES:
        raise GrammarError(f"the JSON schema's enums have {total} values in all; the limit is {MAX_TOTAL_ENUM_VALUES}")


def check_regex(regex: str) -> None:
    """Refuse an empty regex, or one whose nested counted repetitions multiply past
    MAX_NESTED_REPEATS (the lexer would build that many states before giving up)."""
    if not regex:
        raise GrammarError("the regex is empty")
    if nested_repeats(regex) > MAX_NESTED_REPEATS:
        raise GrammarError(f"the regex nests counted repetitions too deeply (more than {MAX_NESTED_REPEATS} "
                           "repeats in all)")


def nested_repeats(regex: str) -> int:
    """The largest product of {n} / {n,m} counts along one path of nested groups (linear scan)."""
    frames, last, index = [1], 1, 0   # frames: the largest product seen inside each open group
    while index < len(regex):
        char = regex[index]
        if char == "\\":
            index, last = index + 1, 1
        elif char == "[":
            index = _class_end(regex, index)
            last = 1
        elif char == "(":
            frames.append(1)
        elif char == ")" and len(frames) > 1:
            last = frames.pop()
        elif char == "{":
            count, index = _count(regex, index)
            last *= count
        else:
            last = 1
        frames[-1] = max(frames[-1], last)
        index += 1
    return max(frames)


def _class_end(regex: str, start: int) -> int:
    index = start + 1
    while index < len(regex) and regex[index] != "]":
        index += 2 if regex[index] == "\\" else 1
    return index


def _count(regex: str, start: int) -> tuple[int, int]:
    """The upper count of a {n} / {n,m} / {n,} at `start`, and where it ends (1 if not one)."""
    end = regex.find("}", start)
    bounds = regex[start + 1:end].split(",") if end > 0 else []
    if not bounds or not all(b.strip().isdigit() or b.strip() == "" for b in bounds) or not bounds[0].strip():
        return 1, start
    return max(int(b) for b in bounds if b.strip()), end


def check_choices(choices: object) -> None:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("choice must be a non-empty list of strings")
    if len(choices) > MAX_ENUM_VALUES:
        raise GrammarError(f"choice has {len(choices)} strings; the limit is {MAX_ENUM_VALUES}")
    if any(not c or len(c) > MAX_CHOICE_CHARS for c in choices):
        raise GrammarError(f"each choice must have 1 to {MAX_CHOICE_CHARS} characters")


def _loaded(source: str, what: str) -> object:
    try:
        return json.loads(source)
    except (ValueError, RecursionError) as error:
        raise GrammarError(f"the {what} is not valid JSON ({error})") from None


def _what(kind: str) -> str:
    return {"json_schema": "JSON schema", "json_object": "grammar", "regex": "regex",
            "choice": "choice list", "lark": "grammar"}[kind]
