"""Verification of drafted tokens (speculative.py): a sequence's last token and its k drafts
ran as k + 1 rows of one step, so row j holds the model's logits for the token after the
j-th draft (row 0: after the last real token).

Each row is sampled exactly as a plain step would sample it (the same processing, the same
draw from the request's own generator), in order, and the drafts are accepted while they
equal the row's token; the first row whose token differs from its draft (or the row after
the last draft) adds the model's token and ends the step. Greedy, this is the usual rule
(drafts accepted while they are the argmax). Sampling, it is the rejection rule for a
point-mass draft d, realised by coupling: d is accepted with probability p(d) under the
row's processed distribution, and otherwise the token follows p with d removed,
renormalised. As no row past a rejection is drawn, the generator advances once per output
token, as without speculation: a seeded request gives the same tokens either way. Row j
is processed as the sequence stood after j drafts, so penalties count them."""
from __future__ import annotations

import torch

from hayate.layers.sampler import Sampler, SamplingState, argmax_list, draw_tokens, process_logits


def verify(logits: torch.Tensor, draft: list[int], state: SamplingState) -> list[int]:
    """The tokens this step gives the sequence: its accepted drafts, then one of the model's.
    logits: [len(draft) + 1, vocab]."""
    if Sampler.argmax_only([state]):   # the usual greedy request: no PyTorch operator runs
        return accept_greedy(draft, argmax_list(logits))
    tokens: list[int] = []
    for row, drafted in enumerate([*draft, None]):   # the last row has no draft: it always ends
        row_state = state.extended(draft[:row]) if _penalised(state) else state
        tokens += draw_tokens(process_logits(logits[row:row + 1], [row_state]), [row_state]).tolist()
        if tokens[-1] != drafted:
            break
    return tokens


def accept_greedy(draft: list[int], targets: list[int]) -> list[int]:
    """Drafts while they equal their row's choice, then the next row's choice."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == targets[accepted]:
        accepted += 1
    return draft[:accepted] + [targets[accepted]]


def _penalised(state: SamplingState) -> bool:
    params = state.params
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
