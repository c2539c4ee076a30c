"""xgrammar as the mask engine for JSON schemas and JSON objects.

xgrammar compiles, per grammar state, which tokens are always or never allowed (its adaptive
token-mask cache), so a step's fill is mostly a lookup: on the default model's 49k vocabulary,
replaying sampled answers to a schema with bounded strings, p99 35 us a fill, where llguidance
walks its whole token trie near a bounded string's end (0.5-0.7 ms a fill). Compiling costs
more (tens of ms, once per schema: the cache is built then).

llguidance stays the checker and the engine for the rest: every spec is compiled by it first
(its errors, limits and strict keyword refusals are the ones a request sees), and regexes,
choice lists, Lark grammars and the tool-call grammars (lazy triggers, %json) run on it. A
JSON schema goes to xgrammar only when every keyword in it is one whose meaning both engines
share (`ELIGIBLE_KEYWORDS`; xgrammar ignores some keywords with a warning, which would break
"always enforced") and when xgrammar compiles its grammar fast (closed objects, few anyOf
branches). Where the two differ on the rest, xgrammar is the stricter (a string's `maxLength`
counts an escape's characters; no `-0`), so its outputs still validate.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

import numpy as np

from hayate.structured.spec import GrammarSpec

log = logging.getLogger(__name__)

CACHE_SIZE = 256
SEPARATORS = (", ", ": ")   # as json.dumps writes JSON, as llguidance is told to (backend.JSON_OPTIONS)
# Keywords xgrammar enforces as JSON Schema means them (checked against llguidance in the tests)
# and annotations that constrain nothing. `pattern` and `format` (regex dialects), `oneOf`,
# `allOf`, `not`, `uniqueItems`, `contains`, `multipleOf`... stay with llguidance.
ELIGIBLE_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength",
    "title", "description", "default", "examples", "$schema", "$comment", "$id", "deprecated", "readOnly",
    "writeOnly"})
MAX_ANYOF_BRANCHES = 32
SCHEMA_MAPS = ("properties", "$defs", "definitions")   # name -> schema


def eligible(spec: GrammarSpec) -> bool:
    """Whether xgrammar enforces `spec` exactly as llguidance would (or more strictly)."""
    if spec.kind == "json_object":
        return True
    if spec.kind != "json_schema":
        return False
    try:
        return _eligible_schema(json.loads(spec.source))
    except (ValueError, RecursionError):
        return False


def _eligible_schema(root: object) -> bool:
    """Keywords both engines read alike, and a grammar xgrammar compiles fast: an object with
    properties must be closed (additionalProperties false, as OpenAI's strict mode and the
    openai client's .parse() make them) and anyOf branches few. An open object's grammar costs
    xgrammar ~10 ms an optional property and ~45 ms an anyOf branch (200 open branches: 10 s)
    where llguidance takes ms; closed, 300 properties take 87 ms."""
    stack, branches = [root], 0
    while stack:
        node = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict) or not ELIGIBLE_KEYWORDS.issuperset(node):
            return False
        if "properties" in node and node.get("additionalProperties") is not False:
            return False
        branches += len(node.get("anyOf") or ())
        if branches > MAX_ANYOF_BRANCHES:
            return False
        for key, value in node.items():
            if key in SCHEMA_MAPS:
                if not isinstance(value, dict):
                    return False
                stack += value.values()
            elif key in ("items", "additionalProperties"):
                stack.append(value)
            elif key in ("prefixItems", "anyOf"):
                if not isinstance(value, list):
                    return False
                stack += value
            elif key in ("enum", "const"):
                # xgrammar writes a structured constant compactly ({"k":[1]}), llguidance as json.dumps
                values = value if key == "enum" and isinstance(value, list) else [value]
                if any(isinstance(item, (dict, list)) for item in values):
                    return False
            elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                return False
    return True


class TokenBytes:
    """What xgrammar's JSON strings let through that JSON or UTF-8 forbids, as mask rows to AND
    with each xgrammar row. A raw control character (bytes 0-31; json.loads refuses "\\x02"):
    with no free whitespace valid nowhere in hayate's JSON. A UTF-16 surrogate encoded as
    UTF-8 (ED A0-BF ..): xgrammar accepts it after an ED lead byte; UTF-8 does not."""

    def __init__(self, decoded_vocab: list[bytes], words: int, added_ids: frozenset[int] = frozenset()):
        """added_ids: the tokenizer's added tokens (control tokens, <think>...), never text to
        llguidance; xgrammar reads some of them as their text, so they are masked here."""
        self.decoded = decoded_vocab   # each token's bytes
        self.valid = _mask_row([not any(byte < 32 or byte == 127 for byte in token) and not _has_surrogate(token)
                                and index not in added_ids for index, token in enumerate(decoded_vocab)], words)
        self.no_continuation_a0 = _mask_row([not (token and 0xA0 <= token[0] <= 0xBF) for token in decoded_vocab],
                                            words)
        self.ends_in_lead_ed = frozenset(index for index, token in enumerate(decoded_vocab) if token.endswith(b"\xed"))


def _has_surrogate(token: bytes) -> bool:
    index = token.find(b"\xed")
    while index != -1:
        if index + 1 < len(token) and 0xA0 <= token[index + 1] <= 0xBF:
            return True
        index = token.find(b"\xed", index + 1)
    return False


def _mask_row(allowed: list[bool], words: int) -> np.ndarray:
    bits = np.zeros(words * 32, dtype=bool)
    bits[:len(allowed)] = allowed
    return np.packbits(bits, bitorder="little").view(np.int32)


class XGrammarMatcher:
    """One request's place in its grammar (GrammarMatcher in backend.py)."""

    def __init__(self, matcher, stop_token_ids: list[int], token_bytes: TokenBytes):
        self.matcher = matcher
        self.stop_token_ids = stop_token_ids
        self.token_bytes = token_bytes
        self.after_lead_ed = False   # the output ends in byte ED: no A0-BF next (a surrogate)
        self._forced: list[int] | None = None   # this state's forced tokens, once asked
        self._error = ""

    def consume(self, token_ids: list[int]) -> bool:
        for token_id in token_ids:
            if not self.matcher.accept_token(token_id):
                self._error = f"token {token_id} does not continue the grammar"
                return False
            self.after_lead_ed = token_id in self.token_bytes.ends_in_lead_ed
        self._forced = None
        return True

    def fill_mask(self, row: np.ndarray) -> None:
        """This matcher's allowed tokens into one int32 mask row (a view into the batch's).
        Where the grammar forces text, only the first of its forced tokens (as llguidance
        does): the model writes forced text as fast-forward would append it, so greedy output
        is the same with and without fast-forward, and it never spells a key letter by letter."""
        forced = self.forced_tokens()
        if forced:
            row[:] = 0
            row[forced[0] >> 5] = np.uint32(1 << (forced[0] & 31)).view(np.int32)
            return
        self.matcher.fill_next_token_bitmask(row.reshape(1, -1), 0)
        row &= self.token_bytes.valid
        if self.after_lead_ed:
            row &= self.token_bytes.no_continuation_a0

    def forced_tokens(self) -> list[int]:
        if self._forced is None:
            self._forced = self.matcher.find_jump_forward_tokens()
        return self._forced

    def is_stopped(self) -> bool:
        """Complete with nothing but a stop token allowed next (llguidance's "stopped"): the
        request ends there instead of sampling its end-of-sequence token."""
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        row = np.zeros(len(self.token_bytes.valid), dtype=np.int32)
        self.fill_mask(row)
        bits = row.view(np.uint32)
        for token_id in self.stop_token_ids:
            bits[token_id >> 5] &= ~np.uint32(1 << (token_id & 31))
        return not bits.any()

    def is_accepting(self) -> bool:
        return self.matcher.is_completed() or self.matcher.is_terminated()

    @property
    def error(self) -> str:
        return self._error


class XGrammarBackend:
    """xgrammar over hayate's own tokenizer (a `tokenizers.Tokenizer`, through transformers'
    wrapper, which xgrammar reads the vocabulary's kind from)."""

    def __init__(self, tokenizer_backend, vocab_size: int, eos_token_ids: list[int], cache_size: int = CACHE_SIZE):
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgrammar = xgrammar
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.stop_token_ids = sorted(eos_token_ids)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer_backend)
        info = xgrammar.TokenizerInfo.from_huggingface(wrapped, vocab_size=vocab_size,
                                                       stop_token_ids=self.stop_token_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        added = frozenset(tokenizer_backend.get_added_tokens_decoder()) - set(self.stop_token_ids)
        self.token_bytes = TokenBytes(info.decoded_vocab, self.words, added)
        self.cache: OrderedDict[GrammarSpec, object | None] = OrderedDict()   # None: llguidance's
        self.cache_size = cache_size
        self.lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids) -> "XGrammarBackend":
        return cls(tokenizer.backend, vocab_size, list(eos_token_ids))

    def compile(self, spec: GrammarSpec) -> bool:
        """Compile `spec` (already checked by llguidance) if it is eligible; False if it is not
        or xgrammar cannot compile it (it then runs on llguidance)."""
        return self._compiled(spec) is not None

    def matcher(self, spec: GrammarSpec) -> XGrammarMatcher | None:
        compiled = self._compiled(spec)
        if compiled is None:
            return None
        return XGrammarMatcher(self.xgrammar.GrammarMatcher(compiled), self.stop_token_ids, self.token_bytes)

    def fill_masks(self, matchers: list[tuple[XGrammarMatcher, int]], bitmask: np.ndarray) -> None:
        for matcher, row in matchers:
            matcher.fill_mask(bitmask[row])

    def _compiled(self, spec: GrammarSpec):
        """The compiled grammar, or None where the spec stays with llguidance (remembered, so
        a request's matcher never reads its schema again)."""
        with self.lock:
            if spec in self.cache:
                self.cache.move_to_end(spec)
                return self.cache[spec]
        compiled = None
        if eligible(spec):
            try:
                compiled = self._compile(spec)
            except Exception as error:   # xgrammar's RuntimeError / ValueError: llguidance runs it instead
                log.info("xgrammar cannot compile a %s (%s); llguidance runs it", spec.kind, error)
        with self.lock:
            self.cache[spec] = compiled
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        # strict_mode=False: JSON Schema's own defaults (unlisted properties and items allowed
        # unless the schema says otherwise), as llguidance reads a schema
        schema = '{"type": "object"}' if spec.kind == "json_object" else spec.source
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=SEPARATORS,
                                                 strict_mode=False)
