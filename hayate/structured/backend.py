"""The grammar backend: compiles GrammarSpecs against one model's tokenizer and makes a
matcher per request. llguidance checks every spec and runs most; RoutedBackend hands the JSON
schemas xgrammar enforces alike to xgrammar, whose masks come precomputed per grammar state
(xgrammar_backend.py). Both implement the two protocols below.

One backend per model, built by its first constrained request or by `hayate serve`'s load,
not by every load (llguidance's tokenizer walk costs ~0.2 s on a 49k vocabulary, ~1 s on
150k, xgrammar's ~0.5-1 s more, and the first mask pays a lazy set-up). Compiled grammars
are cached by their spec; a request's matcher is a copy of the cached, never-used one (µs).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Protocol

import llguidance
import numpy as np

from hayate.structured.limits import check_spec
from hayate.structured.spec import GrammarError, GrammarSpec

CACHE_SIZE = 256
# JSON as json.dumps writes it (what chat templates show models); never free whitespace, so a
# model cannot emit spaces until max_tokens. Overrides: a schema's "x-guidance" cannot undo it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_ERROR_CHARS = 300


class GrammarMatcher(Protocol):
    """One request's place in its grammar."""

    def consume(self, token_ids: list[int]) -> bool: ...     # False: a token the grammar refuses
    def forced_tokens(self) -> list[int]: ...                # the only continuation, if any
    def is_stopped(self) -> bool: ...                        # complete: nothing more may follow
    def is_accepting(self) -> bool: ...
    @property
    def error(self) -> str: ...


class GrammarBackend(Protocol):
    vocab_size: int                                          # bits per mask row

    def compile(self, spec: GrammarSpec) -> None: ...        # GrammarError if unusable; cached
    def matcher(self, spec: GrammarSpec) -> GrammarMatcher: ...
    def fill_masks(self, matchers: list[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None: ...


class LLGuidanceMatcher:
    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def consume(self, token_ids: list[int]) -> bool:
        return self.matcher.consume_tokens(token_ids)

    def forced_tokens(self) -> list[int]:
        return self.matcher.compute_ff_tokens()

    def is_stopped(self) -> bool:
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class LLGuidanceBackend:
    """llguidance over hayate's own tokenizer (a `tokenizers.Tokenizer`)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int],
                 cache_size: int = CACHE_SIZE):
        """vocab_size: the logits' width (tokens past the tokenizer's stay masked)."""
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
        self.limits = llguidance.LLParserLimits(verbose_errors=False)
        self.executor = llguidance.LLExecutor(num_threads=1)
        self.cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()
        self._warm_up()

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids) -> "LLGuidanceBackend":
        """From a hayate Tokenizer (its `tokenizers` backend is what llguidance reads)."""
        return cls(tokenizer.backend.to_str(), vocab_size, list(eos_token_ids))

    def compile(self, spec: GrammarSpec) -> None:
        self._template(spec)

    def matcher(self, spec: GrammarSpec) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._template(spec).deep_copy())

    def fill_masks(self, matchers: list[tuple[LLGuidanceMatcher, int]], bitmask: np.ndarray) -> None:
        """Each matcher's allowed tokens into row `row` of int32 bitmask [rows, ⌈vocab/32⌉]
        (bit t of the row set = token t allowed); the GIL is released meanwhile."""
        pairs = [(m.matcher, row) for m, row in matchers]
        self.executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])

    def _template(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        with self.lock:
            template = self.cache.get(spec)
            if template is not None:
                self.cache.move_to_end(spec)
                return template
        template = self._compiled(spec)
        with self.lock:
            self.cache[spec] = template
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return template

    def _compiled(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        check_spec(spec)
        matcher = llguidance.LLMatcher(self.tokenizer, _grammar(spec), log_level=0, limits=self.limits)
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        return matcher

    def _warm_up(self) -> None:
        """The first mask in a process pays a lazy set-up (ms): pay it at load."""
        matcher = self.matcher(GrammarSpec("json_object"))
        bitmask = np.zeros((1, (self.vocab_size + 31) // 32), dtype=np.int32)
        self.fill_masks([(matcher, 0)], bitmask)


class RoutedBackend:
    """llguidance compiles every spec (so its checks and error messages are the ones a request
    sees); a spec xgrammar enforces alike (xgrammar_backend.eligible) gets xgrammar's matcher.
    A step's masks are filled by each engine for its own rows."""

    def __init__(self, checker: LLGuidanceBackend, fast):
        self.checker = checker
        self.fast = fast   # an XGrammarBackend
        self.vocab_size = checker.vocab_size

    def compile(self, spec: GrammarSpec) -> None:
        self.checker.compile(spec)
        self.fast.compile(spec)

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        self.checker.compile(spec)
        return self.fast.matcher(spec) or self.checker.matcher(spec)

    def fill_masks(self, matchers: list[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None:
        fast = [(matcher, row) for matcher, row in matchers if not isinstance(matcher, LLGuidanceMatcher)]
        if fast:
            self.fast.fill_masks(fast, bitmask)
        if len(fast) < len(matchers):
            self.checker.fill_masks([(m, row) for m, row in matchers if isinstance(m, LLGuidanceMatcher)], bitmask)


def _grammar(spec: GrammarSpec) -> str:
    """llguidance's grammar text for a spec (validated by the matcher built from it)."""
    grammar_from = llguidance.LLMatcher
    if spec.kind == "json_object":
        return grammar_from.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if spec.kind == "json_schema":
        options = JSON_OPTIONS if spec.strict else {**JSON_OPTIONS, "lenient": True}
        try:
            return grammar_from.grammar_from_json_schema(spec.source, overrides=options)
        except ValueError as error:
            raise GrammarError(f"the JSON schema is not valid JSON: {_one_line(str(error))}") from None
    if spec.kind == "regex":
        return grammar_from.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        alternatives = " | ".join(json.dumps(choice) for choice in json.loads(spec.source))
        return grammar_from.grammar_from_lark(f"start: {alternatives}")
    return grammar_from.grammar_from_lark(spec.source)


def _one_line(message: str) -> str:
    """llguidance's errors may span lines (a caret diagram); a user gets one short line."""
    line = " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."


def advance(matcher: GrammarMatcher, token_id: int, room: int, fast_forward: bool) -> tuple[list[int], bool]:
    """Feed a sampled token to its matcher, then (fast_forward) the tokens the grammar forces
    next, at most `room` of them. Returns (the forced tokens consumed, whether the grammar is
    complete). RuntimeError if the grammar refuses a token (the mask should have prevented it)."""
    if not matcher.consume([token_id]):
        raise RuntimeError(f"the grammar refused token {token_id}: {matcher.error}")
    if matcher.is_stopped() or not fast_forward or room <= 0:
        return [], matcher.is_stopped()
    forced = matcher.forced_tokens()[:room]
    if forced and not matcher.consume(forced):
        raise RuntimeError(f"the grammar refused its own forced tokens {forced}: {matcher.error}")
    return forced, matcher.is_stopped()
