"""Structured output at the edge: a request's grammar is parsed and compiled in the handler,
before the request is admitted, so a bad schema or regex is a 400 naming its field before
any token (and a good one waits in the engine's grammar cache for the engine)."""
from __future__ import annotations

import asyncio

from hayate.server.errors import APIError
from hayate.server.protocol import SamplingFields
from hayate.server.state import ServedModel
from hayate.structured import GrammarError


async def check_grammar(body: SamplingFields, model: ServedModel) -> None:
    """400 with param = the field (response_format, structured_outputs, guided_*) if the
    request's grammar is malformed, past a limit, or refused by the compiler."""
    try:
        field = body.grammar_field()
        spec = body.grammar()
    except GrammarError as error:
        raise APIError(400, str(error), param=body.field_named(str(error))) from None
    if spec is None:
        return
    try:   # ~1 ms; off the event loop all the same, since a large grammar may take longer
        await asyncio.to_thread(model.engine.engine.compile_grammar, spec)
    except GrammarError as error:
        raise APIError(400, f"{field}: {error}", param=field) from None
