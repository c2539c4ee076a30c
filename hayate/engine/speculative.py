"""Speculative decoding by prompt lookup (n-gram drafting), exact: no second model (a draft
model's drafting is draft_model.py's, through the same interface and verification).

A decoding sequence whose last n tokens (n = `ngram`, then n - 1, ... 1) occurred earlier in
its prompt or answer proposes the up-to-k tokens that followed their latest occurrence; from
then on a cursor follows that copy, comparing texts without their whitespace (a quote may
rewrap its lines), through tokens the answer changed, left out or added (a renamed variable is
then drafted renamed), and drafts from it until the answer leaves the copy.
The next step runs its last token and the drafts as k + 1 rows at consecutive positions (as
a prompt chunk's rows: scheduler.py gives them the step's spare rows and free blocks), and
verify.py keeps the drafts the model agrees with plus one token of its own. Only the
accepted tokens count as computed; keys and values written for rejected ones lie beyond
num_computed_tokens, where the next step overwrites them before anything reads them.

Drafting is bookkeeping only (no torch): an index of every n-gram's latest end, extended by
the tokens appended since the last draft. How much a sequence drafts, if at all, follows its
acceptance so far and what the step's extra rows cost (draft_policy.py): free-form text,
whose drafts are mostly rejected, runs as plain decode steps with a rare probe.
Not for grammar-constrained requests (a draft would have to follow the grammar's masks row
by row) nor for requests with logprobs (verification samples no alternatives)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from hayate.engine.draft_model import ModelSpeculation
from hayate.engine.draft_policy import Acceptance, StepCosts
from hayate.engine.request import SpeculativeCounts
from hayate.sampling import SamplingParams

if TYPE_CHECKING:
    from hayate.engine.sequence import Sequence


class Draftable(Protocol):
    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, count: int) -> list[int]: ...


@dataclass(frozen=True)
class DraftSettings:
    """How a sequence drafts: `num_tokens` (k) at most per step, after a match of `ngram`
    tokens (n, tried down to 1)."""
    method: str | None             # "ngram", "draft" (the engine's draft model), or None: no speculation
    num_tokens: int
    ngram: int

    def for_request(self, params: SamplingParams) -> "DraftSettings":
        """These settings (the engine's) as one request's parameters override them."""
        method = self.method if params.speculative is None else params.speculative
        return DraftSettings(None if method == "off" else method,
                             params.speculative_tokens or self.num_tokens, params.speculative_ngram or self.ngram)


class NgramIndex:
    """A token list and, for every n-gram (n = 1 .. max_n) that ends before its last token,
    where its latest occurrence ends: the lookup finds the most recent earlier occurrence of
    the list's tail without scanning it."""

    def __init__(self, max_n: int):
        self.tokens: list[int] = []
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n)]   # [n - 1]: n-gram -> end

    def extend(self, token_ids: list[int]) -> None:
        tokens, ends = self.tokens, self.ends
        for token_id in token_ids:
            end = len(tokens)   # the n-grams ending here are followed by token_id
            for n in range(1, min(len(ends), end) + 1):
                ends[n - 1][tuple(tokens[end - n:end])] = end
            tokens.append(token_id)

    def find(self) -> tuple[int, int]:
        """The longest tail that occurred before (n tokens) and where its latest earlier
        occurrence ends; (0, 0) when even the last token is new."""
        tokens = self.tokens
        for n in range(min(len(self.ends), len(tokens)), 0, -1):
            end = self.ends[n - 1].get(tuple(tokens[-n:]))
            if end is not None:
                return n, end
        return 0, 0


class TokenTexts:
    """Each token's text with its whitespace taken out, as the copy cursor compares them (a
    quote may rewrap its source's lines: "the" "\\n" "January" in the source, "the" " January"
    in the answer), and whether it began with whitespace; looked up once per token id."""

    def __init__(self, token_text: Callable[[int], str]):
        self.token_text = token_text
        self.known: dict[int, tuple[str, bool]] = {}

    def __call__(self, token_id: int) -> str:
        return self._known(token_id)[0]

    def leading_space(self, token_id: int) -> bool:
        return self._known(token_id)[1]

    def _known(self, token_id: int) -> tuple[str, bool]:
        known = self.known.get(token_id)
        if known is None:
            text = self.token_text(token_id)
            known = self.known[token_id] = ("".join(text.split()), text[:1].isspace())
        return known


class TokenMarks:
    """TokenTexts where no tokenizer gives texts: every token's text unlike every other's."""

    def __call__(self, token_id: int) -> str:
        return f"<{token_id}>"

    def leading_space(self, token_id: int) -> bool:
        return False


class CopyCursor:
    """Where in the token list the text being written is copied from: the position whose
    text should come next (a token, and how many of its characters the answer has written).
    Texts are compared, not token ids, whitespace aside: an answer that rewraps the source's
    lines reads as the same copy, and while it does, drafts stop before the source's line
    breaks (the model writes the next word with its space itself, as a step's own token).

    A copy edited in place (a renamed variable, a changed word) differs from its source by a
    token here and there; once the copy is confirmed (CONFIRMED tokens in a row agree with the
    source), a token that differs is taken as an omission (it matches the source a few tokens
    on: WINDOW), else as a substitution (the cursor steps over one source token); the token
    after it may also be read as an insertion (it matches where the cursor stood before the
    miss). Two differing tokens in a row, or one before the copy is confirmed, lose it.
    A substitution, or a token the answer ends with other whitespace (".\\n\\n" for ".\\n"), is
    remembered as an edit (source token -> the answer's) that later drafts make too, as a
    renamed variable is renamed everywhere, until the answer keeps that source token as it is."""
    CONFIRMED = 3
    WINDOW = 8

    def __init__(self, texts: TokenTexts | TokenMarks | None = None):
        self.texts = texts or TokenMarks()
        self.at: int | None = None
        self.offset = 0           # characters of source[at]'s text already written
        self.before = (0, 0)      # (at, offset) before the last miss
        self.run = 0              # tokens in a row that agree with the source
        self.confirmed = False
        self.misses = 0           # 1: just passed an edit
        self.reflowing = False    # the answer wrote words where the source broke its line
        self.edits: dict[int, int] = {}   # substitutions: source token -> the answer's
        self.last_edit: int | None = None

    def start(self, at: int) -> None:
        self.at, self.offset, self.run, self.confirmed, self.misses, self.reflowing = at, 0, 0, False, 0, False

    def follow(self, source: list[int], token_id: int) -> None:
        """`token_id` was appended to the list (source holds the tokens before it)."""
        if self.at is None:
            return
        if not self.offset and self.at < len(source):
            if self.edits.get(source[self.at]) == token_id:   # an edit made before, made again
                self.at, self.run, self.misses = self.at + 1, self.run + 1, 0
                return
            if source[self.at] == token_id:
                self.edits.pop(token_id, None)
        text = self.texts(token_id)
        step = self._consume(source, self.at, self.offset, text)
        if (step == (self.at + 1, 0, False) and not self.offset and source[self.at] != token_id
                and self.texts.leading_space(source[self.at]) == self.texts.leading_space(token_id)):
            self.edits[source[self.at]] = token_id   # the same text, ending otherwise: ".\n" -> ".\n\n"
        if step is None and self.misses:   # an insertion: the source waits where it was
            step = self._consume(source, *self.before, text)
            if step is not None:
                self.edits.pop(self.last_edit, None)
        if step is not None:
            self._agreed(source, step, text)
        elif not self.confirmed or self.misses:
            self.at = None
        else:
            self._missed(source, token_id, text)

    def _agreed(self, source: list[int], step: tuple[int, int, bool], text: str) -> None:
        """The answer's token read as the source's text from where the cursor stood: `step`."""
        self.at, self.offset, crossed_break = step
        if text:
            self.run, self.misses = self.run + 1, 0
            self.confirmed = self.confirmed or self.run >= self.CONFIRMED
            self.reflowing = self.reflowing or crossed_break
        elif not self.offset and self.at < len(source) and not self.texts(source[self.at]):
            self.at, self.reflowing = self.at + 1, False   # whitespace where the source has its own

    def _missed(self, source: list[int], token_id: int, text: str) -> None:
        """A confirmed copy's first differing token: an omission, else a substitution (an edit)."""
        self.before, self.run, self.misses, self.last_edit = (self.at, self.offset), 0, 1, None
        omitted = self._omission(source, text)
        if omitted is not None:
            self.at, self.offset = omitted
            return
        if not self.offset and self.at < len(source):
            self.last_edit = source[self.at]
            self.edits[self.last_edit] = token_id
        self.at, self.offset = self.at + 1, 0

    def draft(self, source: list[int], max_tokens: int) -> list[int]:
        if self.at is None or self.offset:   # mid-token: the model finishes the word its own way
            return []
        drafted: list[int] = []
        for position in range(self.at, self.at + max_tokens):
            if position >= len(source):   # the copy overlaps itself (", x, x, x"): it copies its drafts
                drafted.append(drafted[position - len(source)])
                continue
            token_id = source[position]
            if self.reflowing and not self.texts(token_id):
                break
            drafted.append(self.edits.get(token_id, token_id))
        return drafted

    def _consume(self, source: list[int], at: int, offset: int, text: str) -> tuple[int, int, bool] | None:
        """Where the cursor stands after `text` is read from (at, offset), and whether it passed
        a whitespace token on the way; None if the source says otherwise."""
        crossed_break = False
        for char in text:
            if not offset:
                at, skipped = self._skip_breaks(source, at)
                crossed_break = crossed_break or skipped
            if at >= len(source) or self.texts(source[at])[offset] != char:
                return None
            offset += 1
            if offset == len(self.texts(source[at])):
                at, offset = at + 1, 0
        return at, offset, crossed_break

    def _skip_breaks(self, source: list[int], at: int) -> tuple[int, bool]:
        """Past the whitespace tokens at `at`; whether there were any."""
        start = at
        while at < len(source) and not self.texts(source[at]):
            at += 1
        return at, at > start

    def _omission(self, source: list[int], text: str) -> tuple[int, int] | None:
        """The nearest token start within WINDOW tokens past the cursor from which `text` reads
        to a token's end: the answer left out what lies between."""
        if not text:
            return None
        for start in range(self.at + 1, min(self.at + 1 + self.WINDOW, len(source))):
            step = self._consume(source, start, 0, text)
            if step is not None and not step[1]:
                return step[0], 0
        return None


class Speculation:
    """One sequence's drafting: its n-gram index, its copy cursor, the acceptance of drafts
    of each kind (after an n-gram match of each length: a 3-token match in a copied passage
    is right far more often than a 1-token one in free text; from the cursor, copying or just
    past an edit), and its counts (which the request's timings share, so every output
    carries them).

    While the cursor follows a copy it drafts: it knows which occurrence is being copied,
    where the tail's latest occurrence is often the line just written (`totals[c]["` is
    followed by "orders" there and by "first" in the source line being copied), and it
    steps over an edit that leaves the tail matching nothing. Once it has lost the copy, the
    longest n-gram match drafts and puts it where that match's continuation begins."""

    def __init__(self, settings: DraftSettings, texts: TokenTexts | TokenMarks | None = None):
        self.settings = settings
        self.index = NgramIndex(settings.ngram)
        self.cursor = CopyCursor(texts)
        # [n - 1]: after an n-gram match, until the cursor confirms the copy; [ngram]: the
        # cursor copying; [ngram + 1]: it just stepped over an edit
        self.acceptance = [Acceptance() for _ in range(settings.ngram + 2)]
        self.kind = 0                     # the acceptance slot of the draft being verified
        self.counts = SpeculativeCounts()

    def propose(self, sequence: Draftable, room: int, costs: StepCosts, decodes: int, rows: int) -> list[int]:
        """Drafts to follow the sequence, at most `room`, as many as the acceptance of their
        kind and the costs of one of `decodes` decodes in `rows` rows make worthwhile."""
        for acceptance in self.acceptance:
            acceptance.step()
        self._extend(sequence)
        if self.cursor.at is None:
            matched, end = self.index.find()
            if not matched:
                return []
            self.kind = matched - 1
            self.cursor.start(end)
        elif self.cursor.confirmed:
            self.kind = self.settings.ngram + self.cursor.misses
        continuation = self.cursor.draft(self.index.tokens, room)
        rate = self.acceptance[self.kind].rate
        return continuation[:costs.best_draft(rate, len(continuation), decodes, rows)]

    def _extend(self, sequence: Draftable) -> None:
        """The tokens appended since the last draft, into the index and past the cursor."""
        known = len(self.index.tokens)
        for token_id in sequence.token_ids(known, sequence.num_tokens - known):
            self.cursor.follow(self.index.tokens, token_id)
            self.index.extend([token_id])

    def record(self, drafted: int, accepted: int) -> None:
        """A step verified `drafted` tokens and accepted the first `accepted` of them."""
        self.counts.num_draft_tokens += drafted
        self.counts.num_accepted_tokens += accepted
        self.counts.num_draft_steps += 1
        self.acceptance[self.kind].record(drafted, accepted)

    def release(self) -> None:
        """The sequence finished (a draft model's speculation frees its cache blocks here)."""


def speculation_for(params: SamplingParams, defaults: DraftSettings, draft=None, request_id: str = "",
                    texts: TokenTexts | TokenMarks | None = None):
    """A request's drafting state (Speculation, or draft_model.ModelSpeculation with the
    engine's draft model, which the engine's request checks made sure it has for "draft"), or
    None when it does not speculate (off, constrained by a grammar, or asking for logprobs)."""
    settings = defaults.for_request(params)
    if settings.method is None or params.grammar is not None or params.logprobs is not None:
        return None
    if settings.method == "draft":
        return ModelSpeculation(settings, draft, request_id)
    return Speculation(settings, texts)


class NgramDrafter:
    """The scheduler's drafter: a decoding sequence's drafts (its speculation's: prompt lookup
    or the draft model), as long as its acceptance and the step's costs make worthwhile, and
    never past its max_tokens or the context (its last drafted row stays where a plain step's
    row could be)."""

    def __init__(self, max_model_len: int, costs: StepCosts):
        self.max_model_len, self.costs = max_model_len, costs

    def __call__(self, sequence: "Sequence", max_tokens: int, decodes: int, rows: int) -> list[int]:
        """Drafts for one of `decodes` decoding sequences in a step of `rows` rows so far."""
        speculation = sequence.speculation
        if speculation is None:
            return []
        room = min(max_tokens, speculation.settings.num_tokens,
                   sequence.sampling.params.max_tokens - len(sequence.output_token_ids) - 1,
                   self.max_model_len - 1 - sequence.num_tokens)
        return speculation.propose(sequence, room, self.costs, decodes, rows) if room > 0 else []
