"""GrammarSpecs from what callers write: helpers for the Python API, and the request fields of
the OpenAI API (`response_format`) and vLLM's (`structured_outputs`, the older `guided_*`).

Parsing errors are GrammarError (a ValueError) whose message starts with the field's name."""
from __future__ import annotations

import json
from typing import Any

from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from hayate.structured.spec import GrammarError, GrammarSpec

STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def json_schema(schema: dict | bool | str, strict: bool = True) -> GrammarSpec:
    """Output that validates against a JSON schema (a dict, or its JSON text). strict=False
    ignores keywords the engine cannot enforce instead of refusing the schema."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise GrammarError(f"the JSON schema is not valid JSON ({error})") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    # compact, keys in the caller's order: a schema's property order is the order generated
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), strict)


def json_object() -> GrammarSpec:
    """Any JSON object."""
    return GrammarSpec("json_object")


def regex(pattern: str) -> GrammarSpec:
    """Output that matches the whole regex (Rust regex syntax, no lookaround or backrefs)."""
    return GrammarSpec("regex", _text(pattern, "regex"))


def choice(options: list[str]) -> GrammarSpec:
    """Exactly one of the strings."""
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        raise GrammarError("choice must be a list of strings")
    return GrammarSpec("choice", json.dumps(list(options)))


def grammar(text: str) -> GrammarSpec:
    """A Lark grammar in llguidance's dialect, or a llama.cpp GBNF one (converted)."""
    try:
        return GrammarSpec("lark", any_to_lark(_text(text, "grammar")))
    except (GbnfToLarkError, ValueError, IndexError, KeyError) as error:
        raise GrammarError(f"grammar is not valid Lark or GBNF ({error})") from None


def from_response_format(value: Any) -> GrammarSpec | None:
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema",
    "json_schema": {"name", "schema", "strict"}}; None for text."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind != "json_schema":
        raise GrammarError(f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}')
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise GrammarError('response_format needs "json_schema": {"name": ..., "schema": {...}}')
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise GrammarError(f"response_format json_schema.strict must be true or false, got {strict!r}")
    return _field(lambda: json_schema(spec["schema"], strict=bool(strict)), "response_format")


def from_structured_outputs(value: Any) -> GrammarSpec | None:
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GrammarError("structured_outputs must be an object")
    given = [key for key in STRUCTURED_OUTPUT_KINDS if value.get(key) not in (None, False)]
    if len(given) != 1:
        raise GrammarError(f"structured_outputs needs exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}, "
                           f"got {len(given)}")
    return _field(lambda: _vllm_spec(given[0], value[given[0]]), "structured_outputs")


def from_guided(fields: dict[str, Any]) -> GrammarSpec | None:
    """vLLM's older top-level guided_json / guided_regex / guided_choice / guided_grammar."""
    given = {key: value for key, value in fields.items() if value is not None}
    if not given:
        return None
    if len(given) > 1:
        raise GrammarError(f"{sorted(given)[0]} cannot be combined with {sorted(given)[1]}")
    (key, value), = given.items()
    return _field(lambda: _vllm_spec(key.removeprefix("guided_"), value), key)


def _vllm_spec(kind: str, value: Any) -> GrammarSpec:
    if kind == "json":
        return json_schema(value, strict=False)   # vLLM: enforce what is supported
    if kind == "json_object":
        return json_object()
    return {"regex": regex, "choice": choice, "grammar": grammar}[kind](value)


def _field(build, name: str) -> GrammarSpec:
    """Build a spec, naming the request field in its error (the server reports it as param)."""
    try:
        return build()
    except GrammarError as error:
        raise GrammarError(f"{name}: {error}") from None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise GrammarError(f"{name} must be a string, got {type(value).__name__}")
    return value


def from_cli(schema_path: str | None, pattern: str | None) -> GrammarSpec | None:
    """`hayate run/chat --json-schema FILE` / `--regex R` (one of them)."""
    if schema_path and pattern:
        raise GrammarError("--json-schema and --regex cannot be combined")
    if pattern is not None:
        return regex(pattern)
    if schema_path is None:
        return None
    with open(schema_path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        return json_schema(text)
    except GrammarError as error:
        raise GrammarError(f"--json-schema {schema_path}: {error}") from None
