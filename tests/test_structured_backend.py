"""The grammar backend and its pieces: the native mask kernel against its PyTorch twin, the
compiled-grammar cache, bounded JSON whitespace, size limits, and parsing request fields."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hayate.kernels import native_kernels
from hayate.structured import GrammarError, GrammarSpec
from hayate.structured.backend import LLGuidanceBackend, advance
from hayate.structured.masks import GrammarMasks, apply_bitmask_torch
from hayate.structured.requests import (from_guided, from_response_format, from_structured_outputs,
                                        json_object, json_schema)
from tiny_models import BYTE_VOCAB, VOCAB_SIZE


@pytest.fixture(scope="module")
def backend(tokenizer):
    return LLGuidanceBackend.for_tokenizer(tokenizer, VOCAB_SIZE, [BYTE_VOCAB + 3])


def allowed_text(backend, tokenizer, matcher) -> set[str]:
    bitmask = np.zeros((1, (VOCAB_SIZE + 31) // 32), dtype=np.int32)
    backend.fill_masks([(matcher, 0)], bitmask)
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:VOCAB_SIZE]
    return {tokenizer.decode([token], skip_special_tokens=False) for token in np.flatnonzero(bits)}


@pytest.mark.parametrize("vocab", [320, 49152, 1000])
def test_native_mask_equals_torch_twin(vocab):
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("no native kernels here")
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, words), dtype=torch.int32, generator=generator)
    bitmask[1] = 0
    bitmask[2] = -1
    rows = [0, 1, 3]
    native, twin = logits.clone(), logits.clone()
    kernels.mask_logits_(native, bitmask, rows)
    apply_bitmask_torch(twin, bitmask, rows)
    assert torch.equal(native, twin)
    assert torch.equal(native[[2, 4]], logits[[2, 4]])   # rows not listed are untouched
    assert torch.isinf(native[1]).all()


def test_masks_skip_steps_without_constraints(backend):
    masks = GrammarMasks(backend, 4)
    assert masks.start([None, None]) is None


@pytest.mark.parametrize("inline", [True, False])   # filled first, or beside the forward pass
def test_masks_fill_and_apply_only_constrained_rows(backend, tokenizer, inline):
    masks = GrammarMasks(backend, 2, inline=inline)
    matcher = backend.matcher(GrammarSpec("choice", json.dumps(["ab", "cd"])))
    pending = masks.start([None, matcher, None])
    logits = torch.zeros(3, VOCAB_SIZE)
    masks.apply(logits, pending)
    assert torch.equal(logits[[0, 2]], torch.zeros(2, VOCAB_SIZE))
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert sorted(tokenizer.decode([token]) for token in allowed) == ["a", "c"]


def test_json_whitespace_is_never_free(backend, tokenizer):
    """Separators as json.dumps writes them, and no other whitespace, even when the schema's
    own x-guidance asks for it."""
    matcher = backend.matcher(json_schema({"type": "object", "properties": {"a": {"type": "array"}},
                                           "additionalProperties": False,
                                           "x-guidance": {"whitespace_flexible": True}}))
    text = '{"a": [1, 2]'
    allowed = [allowed_text(backend, tokenizer, matcher)]
    for token in tokenizer.encode(text, add_special_tokens=False):
        advance(matcher, token, room=0, fast_forward=False)
        allowed.append(allowed_text(backend, tokenizer, matcher))
    assert allowed[0] == {"{"}
    assert [text[i] for i in range(len(text)) if allowed[i] & {" ", "\n", "\t"}] == [" ", " "]
    assert all(not allowed_now & {"\n", "\t"} for allowed_now in allowed)


def test_fast_forward_tokens_are_consumed(backend, tokenizer):
    matcher = backend.matcher(json_schema({"type": "object", "properties": {"name": {"type": "string"}},
                                           "required": ["name"], "additionalProperties": False}))
    forced, complete = advance(matcher, tokenizer.encode("{", add_special_tokens=False)[0], room=100,
                               fast_forward=True)
    assert tokenizer.decode(forced) == '"name": "' and not complete
    limited = backend.matcher(json_schema({"type": "object", "properties": {"name": {"type": "string"}},
                                           "required": ["name"], "additionalProperties": False}))
    forced, _ = advance(limited, tokenizer.encode("{", add_special_tokens=False)[0], room=3, fast_forward=True)
    assert len(forced) == 3


def test_compiled_grammars_are_cached_and_matchers_independent(backend, tokenizer):
    spec = json_schema({"enum": ["ab", "cd"]})
    backend.compile(spec)
    size = len(backend.cache)
    first, second = backend.matcher(spec), backend.matcher(spec)
    assert len(backend.cache) == size
    advance(first, tokenizer.encode('"', add_special_tokens=False)[0], room=0, fast_forward=False)
    assert allowed_text(backend, tokenizer, second) == {'"'}
    assert allowed_text(backend, tokenizer, first) == {"a", "c"}


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec("json_schema", json.dumps({"enum": list(range(2000))})), "enum has 2000 values"),
    (GrammarSpec("json_schema", json.dumps({"anyOf": [{"enum": list(range(1000))}] * 5})), "in all"),
    (GrammarSpec("json_schema", '{"items": ' * 40 + "{}" + "}" * 40), "nested"),
    (GrammarSpec("json_schema", "5"), "must be an object"),
    (GrammarSpec("json_schema", " " * 70000), "limit"),
    (GrammarSpec("json_schema", '{"type": "string", "format": "weird"}'), "weird"),
    (GrammarSpec("json_schema", '{"$ref": "#/$defs/missing"}'), "missing"),
    (GrammarSpec("regex", ""), "empty"),
    (GrammarSpec("choice", json.dumps(["x"] * 2000)), "limit"),
])
def test_limits_and_errors_name_the_problem(backend, spec, words):
    with pytest.raises(GrammarError, match=words):
        backend.compile(spec)


def test_response_format_parsing():
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == json_object()
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                                                        "schema": {"type": "object"}}})
    assert spec == GrammarSpec("json_schema", '{"type":"object"}', strict=True)
    assert not from_response_format({"type": "json_schema", "json_schema": {"schema": {}}}).strict
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json", {"type": "json_schema", "json_schema": {
            "schema": {}, "strict": "yes"}}):
        with pytest.raises(GrammarError, match="^response_format"):
            from_response_format(bad)


def test_vllm_fields_parsing():
    assert from_structured_outputs({"regex": "a+"}) == GrammarSpec("regex", "a+")
    assert from_structured_outputs({"choice": ["a", "b"]}).kind == "choice"
    assert from_structured_outputs({"json": '{"type": "integer"}'}) == json_schema({"type": "integer"}, strict=False)
    assert from_structured_outputs({"json_object": True}) == json_object()
    assert from_structured_outputs({"grammar": 'root ::= "a"'}).kind == "lark"
    with pytest.raises(GrammarError, match="exactly one"):
        from_structured_outputs({"regex": "a", "choice": ["a"]})
    assert from_guided({"guided_regex": "a+", "guided_json": None}) == GrammarSpec("regex", "a+")
    with pytest.raises(GrammarError, match="guided_choice"):
        from_guided({"guided_regex": "a", "guided_choice": ["a"]})
