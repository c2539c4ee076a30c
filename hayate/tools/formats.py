"""How each model family writes tool calls, as data: one ToolFormat per family, chosen from the
chat template's source at load (its own markers), or by name (`--tool-format`).

Calls are written `prefix + call + (separator + call)* + suffix`, each call one JSON object
`{"name": ..., "<arguments_key>": {...}}` with `, ` and `: ` separators (json.dumps' style,
which chat templates' `tojson` shows the models). Literals may contain the family's special
tokens (`<tool_call>`); the grammar writes those as tokens, the parser sees their text."""
from __future__ import annotations

import json
from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class ToolFormat:
    name: str
    markers: tuple[str, ...]      # any of these in a chat template's source selects this format
    prefix: str                   # opens the calls; its first token is the trigger of `auto`
    separator: str                # between two calls
    suffix: str                   # closes the calls
    arguments_key: str = "arguments"
    tokens: tuple[str, ...] = ()  # literals that are single special tokens in this family's vocabularies
    at_start: bool = False        # calls can only open the answer (no text before them)
    native: bool = True           # the family's templates render `tools` themselves
    trailing: str = ""            # what models write after the suffix before they stop (optional)

    @property
    def trigger(self) -> str:
        """What opens the calls: the prefix's leading special token, else the whole prefix."""
        return next((token for token in self.tokens if self.prefix.startswith(token)), self.prefix)

    def render(self, calls: list[tuple[str, object]]) -> str:
        """The text of `calls` ((name, arguments) pairs) as this family writes them."""
        bodies = [json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
                  for name, arguments in calls]
        return self.prefix + self.separator.join(bodies) + self.suffix


HERMES = ToolFormat(
    "hermes", markers=("<tool_call>",), prefix="<tool_call>\n",
    separator="\n</tool_call>\n<tool_call>\n", suffix="\n</tool_call>", trailing="\n",
    tokens=("<tool_call>", "</tool_call>"))
LLAMA3_JSON = ToolFormat(
    "llama3_json", markers=("<|python_tag|>", '"parameters": dictionary of argument name'),
    prefix="", separator="; ", suffix="", arguments_key="parameters", at_start=True)
MISTRAL = ToolFormat(
    "mistral", markers=("[TOOL_CALLS]",), prefix="[TOOL_CALLS][", separator=", ", suffix="]",
    tokens=("[TOOL_CALLS]",), at_start=True)
# For templates that know nothing of tools (the default SmolLM2's): hayate describes the tools
# in a system message and the model answers with this JSON envelope.
GENERIC_JSON = ToolFormat(
    "json", markers=(), prefix='{"tool_calls": [', separator=", ", suffix="]}", at_start=True, native=False)

FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, GENERIC_JSON)}
FORMAT_NAMES = (AUTO, *FORMATS)


def detect_format(template_source: str | None) -> ToolFormat:
    """The format whose markers the template's source holds; the generic envelope otherwise."""
    for tool_format in FORMATS.values():
        if template_source and any(marker in template_source for marker in tool_format.markers):
            return tool_format
    return GENERIC_JSON


def tool_setup(name: str, template_source: str | None, tokenizer=None) -> "ToolSetup":
    """A model's setup: the format `name` names ("auto": the one its template uses), and which
    of the format's literals its vocabulary holds as single tokens (a hayate Tokenizer's)."""
    if name != AUTO and name not in FORMATS:
        raise ValueError(f"tool format must be one of {', '.join(FORMAT_NAMES)}, got {name!r}")
    detected = detect_format(template_source)
    chosen = detected if name == AUTO else FORMATS[name]
    token_ids: dict[str, int] = {}
    hidden: set[str] = set()
    if tokenizer is not None:
        added = {token.content: (token_id, token.special)
                 for token_id, token in tokenizer.backend.get_added_tokens_decoder().items()}
        for text in chosen.tokens:
            if text in added:
                token_ids[text] = added[text][0]
                if added[text][1]:   # decoding skips special tokens: the parser never sees them
                    hidden.add(text)
    # A template renders tools itself only when it is written for the chosen format.
    return ToolSetup(chosen, chosen.native and chosen is detected, token_ids, frozenset(hidden))


@dataclass(frozen=True)
class ToolSetup:
    """A model's tool-calling setup, fixed at load."""
    format: ToolFormat
    native: bool                  # False: hayate describes the tools in a system message (polyfill)
    token_ids: dict[str, int]     # the format's literals that are single tokens in the vocabulary
    hidden: frozenset[str]        # of those, the ones decoded text leaves out

    @property
    def token_texts(self) -> frozenset[str]:
        return frozenset(self.token_ids)

    @property
    def trigger_token_id(self) -> int | None:
        return self.token_ids.get(self.format.trigger)
