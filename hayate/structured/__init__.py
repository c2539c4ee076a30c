"""Constrained decoding: grammars (JSON schema, regex, choice, Lark) checked and compiled by
llguidance; the JSON schemas xgrammar reads alike get its precomputed masks (backend.py).

The engine sees only "a mask per row" and "forced tokens"; the server and the Python API
build a GrammarSpec (requests.py) and put it on SamplingParams.grammar."""
from hayate.structured.spec import GRAMMAR_KINDS, GrammarError, GrammarSpec

__all__ = ["GRAMMAR_KINDS", "GrammarError", "GrammarSpec"]
