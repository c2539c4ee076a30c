"""xgrammar's masks against llguidance, their slow twin: which schemas it takes, and that
whatever it lets through (random walks through its masks on a byte vocabulary, where every
byte is a token) is valid UTF-8 JSON that validates and that llguidance accepts token for
token; forced text allows only its first forced token; the routed backend's rows."""
from __future__ import annotations

import json

import gguf
import jsonschema
import numpy as np
import pytest

from hayate.config import EngineConfig
from hayate.engine import engine as engine_module
from hayate.loading.gguf import read_metadata
from hayate.loading.tokenizer import Tokenizer
from hayate.structured import GrammarError, GrammarSpec
from hayate.structured.backend import LLGuidanceBackend, LLGuidanceMatcher, RoutedBackend, advance
from hayate.structured.requests import json_object, json_schema, regex
from hayate.structured.xgrammar_backend import XGrammarBackend, XGrammarMatcher, eligible
from structured_schemas import SCHEMAS
from test_tokenizer import train_sentencepiece_vocab, write_tokenizer_gguf
from tiny_models import BYTE_VOCAB, VOCAB_SIZE

EOS = BYTE_VOCAB + 3
WORDS = (VOCAB_SIZE + 31) // 32


@pytest.fixture(scope="module")
def routed(tokenizer):
    return RoutedBackend(LLGuidanceBackend.for_tokenizer(tokenizer, VOCAB_SIZE, [EOS]),
                         XGrammarBackend.for_tokenizer(tokenizer, VOCAB_SIZE, [EOS]))


def allowed(backend, matcher) -> np.ndarray:
    bitmask = np.zeros((1, (backend.vocab_size + 31) // 32), dtype=np.int32)
    backend.fill_masks([(matcher, 0)], bitmask)
    return np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:backend.vocab_size])


def as_bytes(routed, tokens: list[int]) -> bytes:
    return b"".join(routed.fast.token_bytes.decoded[token] for token in tokens)


def byte_token(routed, value: int) -> int:
    return routed.fast.token_bytes.decoded.index(bytes([value]))


def random_walk(backend, spec: GrammarSpec, seed: int, steps: int = 120, eos: int = EOS) -> list[int]:
    """Tokens drawn uniformly from each step's mask until the grammar stops (or EOS)."""
    rng = np.random.default_rng(seed)
    matcher = backend.matcher(spec)
    tokens: list[int] = []
    for _ in range(steps):
        token = int(rng.choice(allowed(backend, matcher)))
        if token == eos:
            break
        tokens.append(token)
        assert matcher.consume([token]), matcher.error
        if matcher.is_stopped():
            break
    return tokens


def test_only_schemas_both_engines_read_alike_go_to_xgrammar():
    def closed(value: dict) -> dict:
        return {"type": "object", "properties": {"a": value}, "required": ["a"], "additionalProperties": False,
                "$defs": {"x": {"type": "integer", "minimum": 0}}}
    assert eligible(json_object())
    assert eligible(json_schema(closed({"type": "string", "maxLength": 4})))
    for keyword in ({"pattern": "a+"}, {"format": "email"}, {"oneOf": [{}]}, {"allOf": [{}]},
                    {"uniqueItems": True}, {"const": {"k": [1]}}, {"enum": [[1], 2]}, {"$ref": "http://x"}):
        assert not eligible(json_schema(closed(keyword))), keyword
    assert not eligible(regex("[a-z]+"))
    # what xgrammar compiles slowly (open objects with properties: ~10 ms a property, ~45 ms
    # an anyOf branch) stays with llguidance
    assert not eligible(json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert not eligible(json_schema(closed({"anyOf": [{"const": index} for index in range(33)]})))
    assert sum(eligible(json_schema(schema)) for schema in SCHEMAS) >= 30


@pytest.mark.parametrize("index", [i for i, schema in enumerate(SCHEMAS) if eligible(json_schema(schema))])
def test_what_xgrammar_lets_through_is_json_that_llguidance_accepts(routed, index):
    spec = json_schema(SCHEMAS[index])
    routed.compile(spec)
    for seed in range(4):
        tokens = random_walk(routed.fast, spec, seed)
        text = as_bytes(routed, tokens).decode("utf-8")
        jsonschema.validate(json.loads(text), SCHEMAS[index])
        twin = routed.checker.matcher(spec)
        assert twin.consume(tokens) and twin.is_accepting(), text


def test_no_raw_control_characters_and_no_surrogates(routed):
    """xgrammar alone lets a string hold byte 0x02 and ED A0 80 (a UTF-16 surrogate)."""
    spec = json_schema({"type": "string"})
    matcher = routed.matcher(spec)
    assert isinstance(matcher, XGrammarMatcher)
    matcher.consume([byte_token(routed, ord('"'))])
    after_quote = {as_bytes(routed, [token])[0] for token in allowed(routed, matcher)}
    assert not after_quote & set(range(32)) and {0x41, 0xED} <= after_quote
    matcher.consume([byte_token(routed, 0xED)])
    assert {as_bytes(routed, [token])[0] for token in allowed(routed, matcher)} == set(range(0x80, 0xA0))
    for seed in range(200):
        text = as_bytes(routed, random_walk(routed.fast, spec, seed, steps=12))
        assert not set(text) & set(range(32))
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as error:   # only a character cut by the walk's end
            assert error.reason == "unexpected end of data", (text, error)


def test_a_sentencepiece_vocabulary_with_added_tokens(tmp_path):
    """Byte-fallback pieces (<0xE3>), ▁ for spaces, control and user-defined added tokens:
    xgrammar alone would let <|im_start|> or <think> into a string."""
    sentencepiece_vocab = train_sentencepiece_vocab()
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", **sentencepiece_vocab)
    tokenizer = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(path)))
    size, eos = len(sentencepiece_vocab["tokens"]), sentencepiece_vocab["eos"]
    routed = RoutedBackend(LLGuidanceBackend.for_tokenizer(tokenizer, size, [eos]),
                           XGrammarBackend.for_tokenizer(tokenizer, size, [eos]))
    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 30}}, "required": ["text"],
              "additionalProperties": False}
    spec = json_schema(schema)
    routed.compile(spec)
    for seed in range(12):
        tokens = random_walk(routed.fast, spec, seed, steps=80, eos=eos)
        twin = routed.checker.matcher(spec)
        assert twin.consume(tokens) and twin.is_accepting(), (tokenizer.decode(tokens), twin.error)
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)


def test_forced_text_allows_only_its_first_forced_token(routed, tokenizer):
    spec = json_schema({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                        "additionalProperties": False})
    matcher = routed.matcher(spec)
    forced, complete = advance(matcher, byte_token(routed, ord("{")), room=100, fast_forward=False)
    assert forced == [] and not complete
    assert tokenizer.decode(matcher.forced_tokens()) == '"name": "'
    assert list(allowed(routed, matcher)) == [byte_token(routed, ord('"'))]
    forced, _ = advance(matcher, byte_token(routed, ord('"')), room=100, fast_forward=True)
    assert tokenizer.decode(forced) == 'name": "'


def test_stopped_once_only_the_end_may_follow(routed):
    matcher = routed.matcher(json_schema({"type": "array", "items": {"type": "integer"}, "maxItems": 1}))
    for char in "[7":
        assert not advance(matcher, byte_token(routed, ord(char)), room=10, fast_forward=False)[1]
    assert matcher.is_accepting() is False
    assert advance(matcher, byte_token(routed, ord("]")), room=10, fast_forward=False)[1]
    open_ended = routed.matcher(json_schema({"type": "integer"}))
    advance(open_ended, byte_token(routed, ord("7")), room=10, fast_forward=False)
    assert open_ended.is_accepting() and not open_ended.is_stopped()   # more digits may follow


def test_routed_backend_checks_with_llguidance_and_fills_each_engines_rows(routed):
    with pytest.raises(GrammarError, match="weird"):
        routed.compile(GrammarSpec("json_schema", '{"type": "string", "format": "weird"}'))
    specs = [json_schema(SCHEMAS[0]), regex("[a-c]{2}"), json_object()]
    matchers = [routed.matcher(spec) for spec in specs]
    assert [type(m) for m in matchers] == [XGrammarMatcher, LLGuidanceMatcher, XGrammarMatcher]
    batch = np.zeros((4, WORDS), dtype=np.int32)
    routed.fill_masks([(matcher, row) for row, matcher in zip((3, 0, 1), matchers)], batch)
    for row, matcher in zip((3, 0, 1), matchers):
        alone = np.zeros((1, WORDS), dtype=np.int32)
        routed.fill_masks([(matcher, 0)], alone)
        assert np.array_equal(batch[row], alone[0])
    assert not batch[2].any()
    assert as_bytes(routed, allowed(routed, matchers[1])) == b"abc"


def test_llguidance_alone_when_asked_or_when_xgrammar_is_missing(tokenizer, monkeypatch):
    assert isinstance(engine_module._grammar_backend(tokenizer, VOCAB_SIZE, frozenset([EOS]), "llguidance"),
                      LLGuidanceBackend)
    assert isinstance(engine_module._grammar_backend(tokenizer, VOCAB_SIZE, frozenset([EOS]), "auto"), RoutedBackend)

    def missing(*args):
        raise ImportError("No module named 'xgrammar'")
    monkeypatch.setattr(engine_module.XGrammarBackend, "for_tokenizer", missing)
    assert isinstance(engine_module._grammar_backend(tokenizer, VOCAB_SIZE, frozenset([EOS]), "auto"),
                      LLGuidanceBackend)
    with pytest.raises(ValueError, match="grammar_backend"):
        EngineConfig(grammar_backend="outlines")
