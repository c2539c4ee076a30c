"""Prompt lookup's drafting (engine/speculative.py: the n-gram index and the copy cursor) as
the bookkeeping it is: which tokens a sequence drafts after what it has written. Whether the
drafts are right only changes speed; test_speculative.py checks that the answers never change."""
from __future__ import annotations

import random

from hayate.engine.draft_policy import StepCosts
from hayate.engine.speculative import DraftSettings, NgramIndex, Speculation, TokenTexts

FREE_ROWS = StepCosts.assumed(16, 0.0)   # rows cost nothing: every step drafts all it can


def test_ngram_index_finds_the_latest_earlier_occurrence_of_the_longest_tail():
    def match(index: NgramIndex, max_tokens: int) -> tuple[int, list[int]]:
        """The match length and up to max_tokens that followed the match; (0, []) for none."""
        n, end = index.find()
        return n, index.tokens[end:end + max_tokens] if n else []

    index = NgramIndex(3)
    index.extend([1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3])
    assert match(index, 4) == (2, [8, 5, 2, 3])       # "5 2 3" unseen; "2 3" last ended before 8
    index.extend([4])
    assert match(index, 4) == (0, [])                 # 4 never occurred before
    index.extend([1, 2])
    assert match(index, 2) == (2, [3, 8])             # "4 1 2" unseen, "1 2" latest before: at 4..6
    index.extend([3])
    assert match(index, 8) == (3, [8, 5, 2, 3, 4, 1, 2, 3])
    whole = NgramIndex(3)
    whole.extend(index.tokens)
    assert whole.ends == index.ends                   # extending in steps equals indexing at once


class Tokens:
    """A Draftable: a token list that grows."""

    def __init__(self, token_ids: list[int]):
        self.ids = list(token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def token_ids(self, start: int, count: int) -> list[int]:
        return self.ids[start:start + count]


def drafting(source: list[int], written: list[int], texts=None):
    """A sequence's speculation over `source` then `written`; propose(room) drafts."""
    speculation = Speculation(DraftSettings("ngram", 6, 3), texts)
    tokens = Tokens(source + written)
    return speculation, tokens, lambda room: speculation.propose(tokens, room, FREE_ROWS, 1, 1)


def test_a_copy_edited_in_place_drafts_the_source_with_its_edits():
    """A function copied with its variable 5 renamed 99: once the copy is confirmed, after the
    model writes 99 where the source has 5 the cursor drafts the source after that 5 (the tail
    "... 99" matches no n-gram, or the wrong place), and from then on 99 wherever the source
    has 5, until the answer keeps a 5. Two differing tokens in a row lose the copy, and so
    does one before it is confirmed."""
    source = [10, 11, 5, 12, 13, 14, 5, 15, 16, 17, 18, 5, 19, 20, 5, 21, 22, 5, 23]
    speculation, written, propose = drafting(source, [10, 11])
    assert propose(6) == [5, 12, 13, 14, 5, 15]              # "10 11" matched
    written.ids += [5, 12, 13, 14, 99]                       # copied (confirmed), then the rename
    assert propose(6) == [15, 16, 17, 18, 99, 19]            # the rename drafted too
    assert speculation.kind == 4                             # drafting past an edit
    written.ids += [15, 16, 17, 18, 99]
    assert propose(4) == [19, 20, 99, 21] and speculation.kind == 3   # the edit made again: copying
    written.ids += [19, 20, 5]                               # the answer keeps a 5: the edit is dropped
    assert propose(4) == [21, 22, 5, 23]
    written.ids += [77, 78]                                  # two tokens unlike the source
    assert propose(4) == []                                  # 78 never occurred: the copy is lost
    _, written, propose = drafting(source, [10, 11])
    propose(6)
    written.ids += [5, 15]                                   # unconfirmed: one miss loses it,
    assert propose(4) == [16, 17, 18, 5]                     # and the n-gram "5 15" drafts
    _, written, propose = drafting(source, [10, 11])
    propose(6)
    written.ids += [5, 12, 13, 14, 98, 97]
    assert propose(4) == []                                  # confirmed, then two misses in a row


def test_a_copy_of_what_was_just_written_drafts_past_the_end():
    """A loop (", x, x, x"): the copy's source is the answer itself, two tokens back, and its
    drafts go on as far as the room allows, as an overlapping copy does."""
    _, written, propose = drafting([1, 2, 3], [7, 8, 7, 8, 7])
    assert propose(5) == [8, 7, 8, 7, 8]


def test_a_copy_that_leaves_out_or_adds_a_token_is_followed():
    source = list(range(10, 30))
    _, written, propose = drafting(source, [10])
    propose(6)
    written.ids += [11, 12, 13, 16]                          # 14 and 15 left out
    assert propose(4) == [17, 18, 19, 20]
    written.ids += [17, 18, 99, 19, 20]                      # 99 added: first read as an edit of 19,
    assert propose(4) == [21, 22, 23, 24]                    # then 19 where the source waited
    written.ids += [21, 22, 23, 24, 25, 19, 20]              # and no edit 19 -> 99 remembered
    speculation, written, propose = drafting(source, [10])
    propose(6)
    written.ids += [11, 12, 13, 14, 15]
    assert propose(3) == [16, 17, 18]


def test_a_quote_that_rewraps_its_lines_stays_one_copy():
    """Texts, not token ids, are compared, whitespace aside: the answer's " January" reads as
    the source's line break and "January", and while the answer rewraps, drafts stop before the
    source's line breaks (the model writes the next word with its own space)."""
    vocabulary = ["The", " chair", " said", " the", "\n", "January", " storm", " closed", " bridge",
                  "bridge", ".", " January", "\n\n"]
    word = {text: token_id for token_id, text in enumerate(vocabulary)}
    texts = TokenTexts(vocabulary.__getitem__)
    assert texts(word["\n\n"]) == "" and texts(word[" January"]) == "January"

    def ids(*words: str) -> list[int]:
        return [word[text] for text in words]

    source = ids("The", " chair", " said", " the", "\n", "January", " storm", " closed", " the", "\n", "bridge", ".")
    speculation, written, propose = drafting(source, ids("The"), texts)
    assert propose(6) == ids(" chair", " said", " the", "\n", "January", " storm")
    written.ids += ids(" chair", " said", " the", " January")   # the line break became a space
    assert propose(6) == ids(" storm", " closed", " the")       # up to the next break
    written.ids += ids(" storm", " closed", " the", " bridge")
    assert propose(1) == ids(".") and speculation.kind == 3     # one copy all along
    # an answer that keeps the source's line breaks drafts through them
    _, written, propose = drafting(source, ids("The"), texts)
    propose(6)
    written.ids += ids(" chair", " said", " the", "\n")
    assert propose(6) == ids("January", " storm", " closed", " the", "\n", "bridge")


def test_a_token_spaced_otherwise_is_drafted_as_the_answer_spaced_it():
    """The source ends its sentences with ".\\n", the answer with ".\\n\\n" (one token each):
    after the first, drafts end sentences the answer's way."""
    vocabulary = ["The", " chair", " said", " it", " fell", ".\n", ".\n\n", " It", " rose", "It", "\n"]
    texts = TokenTexts(vocabulary.__getitem__)
    source = [0, 1, 2, 3, 4, 5, 7, 8, 5, 7, 4, 5]
    _, written, propose = drafting(source, [0], texts)
    propose(6)
    written.ids += [1, 2, 3, 4, 6]                     # ".\n\n" where the source has ".\n"
    assert propose(6) == [7, 8, 6, 7, 4, 6]
    # a token that only begins otherwise ("It" after a line break the answer added) is no edit
    _, written, propose = drafting(source, [0], texts)
    propose(6)
    written.ids += [1, 2, 3, 4, 5, 10, 9]              # "\n" "It" where the source has " It"
    assert propose(4) == [8, 5, 7, 4]


def test_noisy_copies_never_break_the_bookkeeping():
    """Random sources and answers that copy them with random edits, omissions, insertions,
    line breaks and loops: drafting never fails and never drafts past the room it is given."""
    vocabulary = ["a", " b", "b", " c", "\n", "\n\n", " ", ".", ".\n", " d", "d", "e", " e", "x", ", x"]
    texts = TokenTexts(vocabulary.__getitem__)
    for seed in range(200):
        rng = random.Random(seed)
        source = [rng.randrange(len(vocabulary)) for _ in range(rng.randrange(1, 40))]
        speculation, written, propose = drafting(source, [], texts)
        at = rng.randrange(len(source))
        for _ in range(60):
            roll = rng.random()
            if roll < 0.7 and at < len(written.ids):
                written.ids.append(written.ids[at])
                at += 1
            elif roll < 0.8:
                at += rng.randrange(1, 4)
            else:
                written.ids.append(rng.randrange(len(vocabulary)))
            room = rng.randrange(0, 8)
            drafts = propose(room)
            assert len(drafts) <= room and all(0 <= token < len(vocabulary) for token in drafts)
