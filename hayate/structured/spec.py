"""The grammar a request's output must follow: a plain record, shared by the server, the
tool-call formats and the engine."""
from __future__ import annotations

from dataclasses import dataclass

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


class GrammarError(ValueError):
    """A grammar that cannot be used: invalid, unsupported, or past a size limit (one line)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained request's output must match.

    kind: one of GRAMMAR_KINDS. source: compact JSON of the schema (keys in their order: it
    is the order properties are generated in) for "json_schema" ("" for "json_object": any JSON object), the regex for "regex", a JSON list
    of the strings for "choice", or Lark text in llguidance's dialect (may embed %json{...}
    and lazy triggers) for "lark". strict: for JSON schemas, refuse keywords the engine
    cannot enforce (False: ignore them, the rest is still enforced). Equal specs compile to
    the same grammar (the cache key).
    """
    kind: str
    source: str = ""
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, "
                             f"got {self.kind!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"grammar source must be a string, got {type(self.source).__name__}")
