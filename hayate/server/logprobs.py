"""Token log-probabilities in the two shapes OpenAI uses: chat (`logprobs.content`, one entry
per token with bytes and top alternatives) and text completions (parallel lists)."""
from __future__ import annotations

import math

from hayate.engine.request import TokenLogprob
from hayate.loading.tokenizer import Tokenizer
from hayate.server.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

LOWEST_LOGPROB = -9999.0   # OpenAI's floor for impossible tokens: JSON has no -inf


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB) if not math.isnan(logprob) else LOWEST_LOGPROB


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = tokenizer.token_text(token_id)
    # The token's own text, encoded: a token that is part of a UTF-8 character reads as U+FFFD.
    return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    content = []
    for entry in entries:
        chosen = _top(tokenizer, entry.token_id, entry.logprob)
        alternatives = [_top(tokenizer, token_id, logprob) for token_id, logprob in entry.top]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """`text_offset` is where the first of these tokens starts in the choice's text."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for entry in entries:
        text = tokenizer.token_text(entry.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(_finite(entry.logprob))
        result.text_offset.append(text_offset)
        text_offset += len(text)
        top: dict[str, float] = {}
        for token_id, logprob in entry.top:   # most likely first: it keeps a repeated spelling
            top.setdefault(tokenizer.token_text(token_id), _finite(logprob))
        result.top_logprobs.append(top)
    return result
