"""Per-request sampling parameters and the stop-string matcher for streamed text."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from hayate.structured.spec import GrammarSpec

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024        # per stop string: the matcher holds back up to this much text
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024        # entries per request: every step of the batch applies them
MAX_TOP_K = 2**31 - 1        # larger values mean "off" as well; beyond it is a mistake
SEED_RANGE = (-(2**63), 2**64 - 1)
SPECULATIVE_METHODS = ("ngram", "draft")   # drafters (engine/speculative.py, engine/draft_model.py)
MAX_DRAFT_TOKENS = 15        # a drafted step's rows: the last token and its drafts, one planned step's 16
MAX_NGRAM = 8


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(name: str, value: object, low: float, high: float,
                 low_open: bool = False) -> None:
    """Raise ValueError naming `name` unless value is a finite number in [low, high]."""
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        raise ValueError(f"{name} must be in {left}{low}, {high}], got {value!r}")


@dataclass
class SamplingParams:
    """How one request picks its tokens; validated on construction.

    repetition_penalty is HF/CTRL style over prompt + generated ids (positive logits are
    divided, negative multiplied); presence/frequency penalties are OpenAI style over the
    generated ids only. logit_bias keys may be ints or decimal strings (as JSON sends them).
    """
    max_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None       # chosen token's logprob plus this many top alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: GrammarSpec | None = None   # constrained decoding: the output must match it
    # speculative decoding: "ngram" (prompt lookup), "draft" (the engine's draft model), "off",
    # or None for the engine's setting;
    # drafts of at most speculative_tokens after a match of speculative_ngram tokens (None: the engine's)
    speculative: str | None = None
    speculative_tokens: int | None = None
    speculative_ngram: int | None = None

    def __post_init__(self) -> None:
        self._check_lengths()
        self._check_filters()
        self._check_penalties()
        check_speculative(self.speculative, self.speculative_tokens, self.speculative_ngram, request=True)
        self.stop = self._normalised_stop(self.stop)
        self.stop_token_ids = self._normalised_stop_token_ids(self.stop_token_ids)
        self.logit_bias = self._normalised_logit_bias(self.logit_bias)
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"grammar must be a GrammarSpec or None, got {self.grammar!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id in stop_token_ids or logit_bias is outside the vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias)):
            bad = [token_id for token_id in ids if token_id >= vocab_size]
            if bad:
                raise ValueError(f"{name} has token id {bad[0]}, but the vocabulary has "
                                 f"{vocab_size} tokens")

    def _check_lengths(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be a 64-bit integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, "
                             f"got {self.logprobs!r}")

    def _check_filters(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 100.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in [1, {MAX_TOP_K}], or 0 / -1 to disable it, "
                             f"got {self.top_k!r}")

    def _check_penalties(self) -> None:
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)

    @staticmethod
    def _normalised_stop(stop: object) -> list[str]:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop allows at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        return list(stops)

    @staticmethod
    def _normalised_stop_token_ids(ids: object) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
        return list(ids)

    @staticmethod
    def _normalised_logit_bias(bias: object) -> dict[int, float]:
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias allows at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        normalised: dict[int, float] = {}
        for key, value in bias.items():
            digits = key.strip() if isinstance(key, str) else ""
            token_id = int(digits) if digits.isascii() and digits.isdigit() else key
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {key!r}")
            _check_range(f"logit_bias[{token_id}]", value, -100.0, 100.0)
            normalised[token_id] = float(value)
        return normalised


def check_speculative(method: object, num_tokens: object, ngram: object, request: bool = False) -> None:
    """Raise ValueError unless these name a drafter (or None) and give draft and match lengths
    in range; a request's may also be "off", and None lengths (the engine's)."""
    names = SPECULATIVE_METHODS + (("off",) if request else ())
    if method is not None and method not in names:
        raise ValueError(f"speculative must be one of {', '.join(names)} or None, got {method!r}")
    lengths = (("speculative_tokens", num_tokens, MAX_DRAFT_TOKENS), ("speculative_ngram", ngram, MAX_NGRAM))
    for name, value, high in lengths:
        if (value is not None or not request) and (not _is_int(value) or not 1 <= value <= high):
            raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")


class StopStringMatcher:
    """Finds stop strings in one request's streamed text, across delta boundaries.

    Text that could still be the start of a stop string is held back, so a stop string is
    never partly streamed. When several stops occur, the one that completes first in the
    text wins (ties: the one starting earlier), so the result does not depend on how the
    text was split into deltas.
    """

    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(stops)
        self.include_stop = include_stop
        self.held = ""            # text received but not yet emitted
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a text delta; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        text = self.held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.held, self.stopped = "", True
            return text[:start] + (stop if self.include_stop else ""), True
        keep_from = self._partial_start(text)
        self.held = text[keep_from:]
        return text[:keep_from], False

    def flush(self) -> str:
        """Release held-back text when the request ends for another reason."""
        text, self.held = self.held, ""
        return "" if self.stopped else text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None   # (end, start, stop)
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_start(self, text: str) -> int:
        """Index where the longest tail of `text` that begins some stop string starts.
        Only places holding a stop's first character are tried: linear in practice."""
        best = len(text)
        for stop in self.stops:
            start = text.find(stop[0], max(0, len(text) - len(stop) + 1), best)
            while start != -1:
                if stop.startswith(text[start:]):
                    best = start
                    break
                start = text.find(stop[0], start + 1, best)
        return best
