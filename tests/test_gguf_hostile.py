"""Hostile GGUF files: each mutation of a tiny valid file is refused with one GGUFError (or
ModelLoadError) line naming the key or tensor at fault, fast, before anything large is allocated."""
from __future__ import annotations

import resource
import struct
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from hayate.config import EngineConfig
from hayate.layers.rotary import inverse_frequencies
from hayate.loading import loader
from hayate.loading.gguf import GGUFError, GGUFModelFile
from hayate.loading.loader import ModelLoadError, load_model
from hayate.loading.tokenizer import Tokenizer

QType, ValueType = gguf.GGMLQuantizationType, gguf.GGUFValueType
ARCH = "llama"
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT = 32, 4, 2, 64, 2, 64
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "hi", "Ġa"]
MERGES = ["h i", "Ġ a"]
VOCAB = len(TOKENS)
DELETE = object()   # an override that leaves the key (or tensor) out


# ---- a tiny valid file, and mutants of it ----------------------------------------------------

def tiny_metadata() -> dict[str, tuple]:
    """key -> (value, value type[, array element type]), as llama.cpp's converter writes them."""
    uint32 = ValueType.UINT32
    return {
        f"{ARCH}.block_count": (LAYERS, uint32), f"{ARCH}.context_length": (CONTEXT, uint32),
        f"{ARCH}.embedding_length": (HIDDEN, uint32), f"{ARCH}.feed_forward_length": (FFN, uint32),
        f"{ARCH}.attention.head_count": (HEADS, uint32), f"{ARCH}.attention.head_count_kv": (KV_HEADS, uint32),
        f"{ARCH}.rope.freq_base": (10000.0, ValueType.FLOAT32),
        f"{ARCH}.attention.layer_norm_rms_epsilon": (1e-5, ValueType.FLOAT32),
        f"{ARCH}.vocab_size": (VOCAB, uint32), f"{ARCH}.rope.dimension_count": (HEAD_DIM, uint32),
        "tokenizer.ggml.model": ("gpt2", ValueType.STRING), "tokenizer.ggml.pre": ("smollm", ValueType.STRING),
        "tokenizer.ggml.tokens": (TOKENS, ValueType.ARRAY, ValueType.STRING),
        "tokenizer.ggml.token_type": ([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)), ValueType.ARRAY,
                                      ValueType.INT32),
        "tokenizer.ggml.merges": (MERGES, ValueType.ARRAY, ValueType.STRING),
        "tokenizer.ggml.bos_token_id": (1, uint32), "tokenizer.ggml.eos_token_id": (2, uint32),
        "tokenizer.ggml.add_bos_token": (False, ValueType.BOOL),
        "tokenizer.chat_template": ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
                                    ValueType.STRING),
    }


def tiny_tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, QType]]:
    """GGUF name -> (values in torch order, stored type): Q8_0 embedding and MLP, F32 elsewhere."""
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    tensors = {"token_embd.weight": (weight(VOCAB, HIDDEN), QType.Q8_0),
               "output_norm.weight": (1 + weight(HIDDEN), QType.F32)}
    for i in range(LAYERS):
        tensors.update({
            f"blk.{i}.attn_norm.weight": (1 + weight(HIDDEN), QType.F32),
            f"blk.{i}.ffn_norm.weight": (1 + weight(HIDDEN), QType.F32),
            f"blk.{i}.attn_q.weight": (weight(q_rows, HIDDEN), QType.F32),
            f"blk.{i}.attn_k.weight": (weight(kv_rows, HIDDEN), QType.F32),
            f"blk.{i}.attn_v.weight": (weight(kv_rows, HIDDEN), QType.F32),
            f"blk.{i}.attn_output.weight": (weight(HIDDEN, q_rows), QType.F32),
            f"blk.{i}.ffn_gate.weight": (weight(FFN, HIDDEN), QType.Q8_0),
            f"blk.{i}.ffn_up.weight": (weight(FFN, HIDDEN), QType.Q8_0),
            f"blk.{i}.ffn_down.weight": (weight(HIDDEN, FFN), QType.Q8_0)})
    return tensors


def write_gguf(path: Path, metadata: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None) -> Path:
    """The tiny model with some metadata / tensors replaced (DELETE: left out)."""
    writer = gguf.GGUFWriter(str(path), ARCH)
    for key, entry in {**tiny_metadata(), **(metadata or {})}.items():
        if entry is not DELETE:
            writer.add_key_value(key, entry[0], entry[1], entry[2] if len(entry) > 2 else None)
    for name, entry in {**tiny_tensors(), **(tensors or {})}.items():
        if entry is DELETE:
            continue
        values, qtype = entry
        if qtype in (QType.F32, QType.F16):
            writer.add_tensor(name, values.astype(np.float32 if qtype == QType.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_entry_offset(path: Path, name: str, part: int) -> int:
    """Where in the file part `part` of a tensor's entry starts (2: dimension count, 3: dimensions,
    4: type, 5: data offset)."""
    field = next(t.field for t in gguf.GGUFReader(path).tensors if t.name == name)
    return field.offset + sum(int(p.nbytes) for p in field.parts[:part])


def patch(path: Path, offset: int, data: bytes) -> Path:
    content = bytearray(path.read_bytes())
    content[offset:offset + len(data)] = data
    path.write_bytes(bytes(content))
    return path


def assert_refused(path: Path, *words: str, error: type = GGUFError) -> str:
    """Loading `path` as the CLI does fails fast with one line mentioning all `words`."""
    start, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(error) as raised:
        load_model(EngineConfig(model=str(path), threads=1))
    message = str(raised.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB
    return message


# ---- the tiny file itself --------------------------------------------------------------------

def test_tiny_file_loads_and_runs(tmp_path):
    from hayate.llm import LLM
    from hayate.sampling import SamplingParams

    llm = LLM(config=EngineConfig(model=str(write_gguf(tmp_path / "m.gguf")), threads=1))
    assert llm.tokenizer.encode("hi", add_special_tokens=False) == [TOKENS.index("hi")]
    result = llm.generate([1, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(result.token_ids) == 2 and all(0 <= t < VOCAB for t in result.token_ids)


# ---- metadata values -------------------------------------------------------------------------

U32, I32, U64, STR = ValueType.UINT32, ValueType.INT32, ValueType.UINT64, ValueType.STRING


@pytest.mark.parametrize("key, entry, words", [
    ("attention.head_count", (0, U32), ["must be a positive integer, got 0"]),
    ("attention.head_count", (-1, I32), ["must be a positive integer, got -1"]),
    ("attention.head_count", (6, U32), ["head_count 6 does not divide", "embedding_length 32"]),
    ("attention.head_count_kv", (3, U32), ["head_count_kv 3 does not divide"]),
    ("attention.key_length", (2 ** 32 - 1, U32), ["4294967295"]),
    ("attention.key_length", (16, U32), ["16"]),
    ("attention.value_length", (4, U32), ["value_length is 4"]),
    ("embedding_length", (1_000_000, U32), ["1000000"]),
    ("embedding_length", (-5, I32), ["got -5"]),
    ("feed_forward_length", ([64, 64], ValueType.ARRAY, U32), ["got an array of 2 elements"]),
    ("feed_forward_length", (128, U32), ["128"]),
    ("block_count", (0, U32), ["got 0"]),
    ("block_count", (3, U32), ["block_count is 3", "2 layers"]),
    ("context_length", (2 ** 40, U64), ["1099511627776"]),
    ("context_length", (0, U32), ["got 0"]),
    ("rope.freq_base", (float("nan"), ValueType.FLOAT32), ["nan"]),
    ("attention.layer_norm_rms_epsilon", (-1.0, ValueType.FLOAT32), ["-1.0"]),
    ("rope.scaling.type", ("yarn", STR), ["'yarn'", "not support"]),
    ("rope.scaling.type", ("llama3", STR), ["'llama3'", "rope_freqs.weight"]),
    ("rope.scaling.type", ("linear", STR), []),   # + a factor of "two": below
    ("vocab_size", (1000, U32), ["1000", f"{VOCAB} rows"]),
    ("rope.dimension_count", (4, U32), ["rope.dimension_count is 4"]),
])
def test_bad_model_value(tmp_path, key, entry, words):
    metadata = {f"{ARCH}.{key}": entry}
    if entry[0] == "linear":
        metadata[f"{ARCH}.rope.scaling.factor"] = ("two", STR)
        key, words = "rope.scaling.factor", ["'two'"]
    assert_refused(write_gguf(tmp_path / "m.gguf", metadata), "m.gguf: ", f"{ARCH}.{key}", *words)


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"])
def test_missing_model_key(tmp_path, key):
    assert_refused(write_gguf(tmp_path / "m.gguf", {f"{ARCH}.{key}": DELETE}), f"{ARCH}.{key}", "missing")


def test_huge_block_count_fails_fast(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {f"{ARCH}.block_count": (1_000_000, U32)})
    start = time.perf_counter()
    assert_refused(path, "block_count is 1000000", "2 layers")
    assert time.perf_counter() - start < 0.5


def test_missing_layer_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tensors={"blk.1.ffn_down.weight": DELETE})
    assert_refused(path, "blk.1.ffn_down.weight", "missing")


@pytest.mark.parametrize("name, shape", [("blk.0.ffn_up.bias", (FFN,)), ("output_norm.bias", (HIDDEN,)),
                                         ("blk.1.attn_q.bias", (HIDDEN,))])
def test_tensor_the_model_has_no_place_for(tmp_path, name, shape):
    path = write_gguf(tmp_path / "m.gguf", tensors={name: (np.zeros(shape, np.float32), QType.F32)})
    assert_refused(path, name)


def test_tensor_shape_disagrees_with_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tensors={"blk.0.attn_k.weight": (np.ones((8, HIDDEN), np.float32), QType.F32)})
    assert_refused(path, "blk.0.attn_k.weight", "(8, 32)", "head_count_kv=2", "(16, 32)")


def test_memory_estimate_refuses_before_allocating(tmp_path, monkeypatch):
    class Tight:
        available = total = 10_000
    monkeypatch.setattr(loader.psutil, "virtual_memory", lambda: Tight())
    assert_refused(write_gguf(tmp_path / "m.gguf"), "m.gguf needs about", "--max-model-len", error=ModelLoadError)


@pytest.mark.parametrize("factors, words", [
    ([0.0, 1.0, 1.0, 1.0], "not positive finite numbers"),
    ([1.0, float("nan"), 1.0, 1.0], "not positive finite numbers"),
    ([1.0, 1.0, 1.0], "must hold 4 float factors"),
    ([1.0, 7.0, 2.0, 5.0], "cannot interpret"),
    ([1.0, 1.5, 2.5, 8.0], "cannot interpret"),
])
def test_bad_rope_factors(tmp_path, factors, words):
    tensors = {"rope_freqs.weight": (np.array(factors, np.float32), QType.F32)}
    assert_refused(write_gguf(tmp_path / "m.gguf", tensors=tensors), "m.gguf", words)


def test_rotary_llama3_scaling_without_its_keys():
    with pytest.raises(ValueError, match="low_freq_factor"):
        inverse_frequencies(8, 10000.0, {"rope_type": "llama3", "factor": 8.0})


# ---- tokenizer keys --------------------------------------------------------------------------

ARRAY = ValueType.ARRAY


@pytest.mark.parametrize("key, entry, words", [
    ("tokens", (list(range(VOCAB)), ARRAY, I32), ["must be an array of strings", "element 0 is 0"]),
    ("tokens", (TOKENS[:-1], ARRAY, STR), [f"{VOCAB - 1} tokens", f"{VOCAB} rows"]),
    ("tokens", ("abc", STR), ["must be an array of strings, got 'abc'"]),
    ("merges", (["h i", "nospace"], ARRAY, STR), ["element 1 is 'nospace'"]),
    ("merges", (["h i", "a b c"], ARRAY, STR), ["element 1 is 'a b c'"]),
    ("merges", ([1, 2], ARRAY, I32), ["element 0 is 1"]),
    ("merges", (["h z"], ARRAY, STR), ["entry 0 (h z)", "not tokens of the vocabulary"]),
    ("token_type", ([1] * (VOCAB - 1), ARRAY, I32), [f"{VOCAB - 1} elements"]),
    ("token_type", (["x"] * VOCAB, ARRAY, STR), ["element 0 is 'x'"]),
    ("scores", (["x"] * VOCAB, ARRAY, STR), ["must be an array of numbers"]),
    ("bos_token_id", ("1", STR), ["got '1'"]),
    ("bos_token_id", ([1, 2], ARRAY, U32), ["got an array of 2 elements"]),
    ("eos_token_id", (VOCAB, U32), [f"got {VOCAB}"]),
    ("eot_token_id", (-1, I32), ["got -1"]),
    ("unknown_token_id", (1.5, ValueType.FLOAT32), ["got 1.5"]),
    ("model", ("rwkv", STR), ["'rwkv'"]),
    ("model", (3, U32), ["3"]),
    ("add_bos_token", ("yes", STR), ["true or false"]),
])
def test_bad_tokenizer_value(tmp_path, key, entry, words):
    path = write_gguf(tmp_path / "m.gguf", {f"tokenizer.ggml.{key}": entry})
    assert_refused(path, f"m.gguf: tokenizer.ggml.{key}", *words)


def test_chat_template_must_be_text(tmp_path):
    assert_refused(write_gguf(tmp_path / "m.gguf", {"tokenizer.chat_template": (7, U32)}), "tokenizer.chat_template")


def test_tokenizer_from_metadata_checks_its_input():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(GGUFError, match="merges entry 0"):
        Tokenizer.from_gguf_metadata(metadata)
    with pytest.raises(GGUFError, match="token_type"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1]})


def test_sentencepiece_merges_from_a_huge_token_stay_fast():
    tokens = ["<unk>", "a", "b", "ab", "a" * 200_000]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0, -4.0], "tokenizer.ggml.token_type": [2, 1, 1, 1, 1]}
    start = time.perf_counter()
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert time.perf_counter() - start < 2.0
    assert tokenizer.encode("ab", add_special_tokens=False)[-1] == 3


# ---- the tensor table and the file's structure -----------------------------------------------

def test_zero_dimensional_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tensors={"output_norm.weight": (np.array(1.0, np.float32), QType.F32)})
    assert_refused(path, "truncated or corrupt", "tensor output_norm.weight has 0 dimensions")


def test_zero_size_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    patch(path, tensor_entry_offset(path, "output_norm.weight", 3), struct.pack("<Q", 0))
    assert_refused(path, "truncated or corrupt", "tensor output_norm.weight has size zero")


def test_tensor_data_past_the_end_of_the_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    patch(path, tensor_entry_offset(path, "blk.1.ffn_down.weight", 5), struct.pack("<Q", 1 << 40))
    assert_refused(path, "truncated or corrupt", "blk.1.ffn_down.weight", "runs past the end of the file")


def test_tensor_with_huge_dimensions(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    patch(path, tensor_entry_offset(path, "token_embd.weight", 3), struct.pack("<QQ", 2 ** 40, 2 ** 40))
    assert_refused(path, "token_embd.weight", "runs past the end of the file")


def test_quantized_rows_that_are_not_whole_blocks(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    patch(path, tensor_entry_offset(path, "blk.0.ffn_up.weight", 3), struct.pack("<Q", 48))
    assert_refused(path, "blk.0.ffn_up.weight", "not whole Q8_0 blocks of 32")


def test_unknown_tensor_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    patch(path, tensor_entry_offset(path, "output_norm.weight", 4), struct.pack("<I", 999))
    assert_refused(path, "output_norm.weight", "unknown type 999")


@pytest.mark.parametrize("keep_fraction", [0.02, 0.2, 0.5, 0.99])
def test_truncated_file(tmp_path, keep_fraction):
    content = write_gguf(tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(content[:int(len(content) * keep_fraction)])
    assert_refused(tmp_path / "cut.gguf", "cut.gguf is truncated or corrupt")


@pytest.mark.parametrize("field, value, words", [
    (8, 2 ** 62, "tensors, more than the file holds"),           # tensor count
    (16, 2 ** 62, "metadata fields, more than the file holds"),  # field count
])
def test_header_counts_beyond_the_file(tmp_path, field, value, words):
    path = patch(write_gguf(tmp_path / "m.gguf"), field, struct.pack("<Q", value))
    assert_refused(path, "truncated or corrupt", words)


@pytest.mark.parametrize("count", [2 ** 20 + 1, 2 ** 40, 2 ** 64 - 1])
def test_array_count_beyond_the_file(tmp_path, count):
    path = write_gguf(tmp_path / "m.gguf")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    count_offset = field.offset + sum(int(p.nbytes) for p in field.parts[:4])   # key, type, element type
    assert_refused(patch(path, count_offset, struct.pack("<Q", count)), f"claims {count} elements")


def test_big_endian_file(tmp_path):
    path = patch(write_gguf(tmp_path / "m.gguf"), 4, struct.pack(">I", 3))
    assert_refused(path, "truncated or corrupt", "byte order")


# ---- through the command line ----------------------------------------------------------------

@pytest.mark.parametrize("metadata, words", [
    ({f"{ARCH}.attention.head_count": (-3, I32)}, "llama.attention.head_count must be a positive integer, got -3"),
    ({f"{ARCH}.block_count": (1_000_000, U32)}, "llama.block_count is 1000000"),
    ({"tokenizer.ggml.tokens": (list(range(VOCAB)), ARRAY, I32)}, "tokenizer.ggml.tokens"),
])
def test_cli_prints_one_line(tmp_path, capsys, metadata, words):
    from hayate.cli import main

    path = write_gguf(tmp_path / "model.gguf", metadata)
    assert main(["run", "--model", str(path), "--threads", "1", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("hayate: error: ") and words in err, err


def test_cli_truncated_file(tmp_path, capsys):
    from hayate.cli import main

    content = write_gguf(tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(content[:len(content) // 3])
    assert main(["run", "--model", str(tmp_path / "cut.gguf"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or corrupt" in err, err


def test_model_file_keeps_hf_config_for_a_valid_file(tmp_path):
    config = GGUFModelFile(write_gguf(tmp_path / "m.gguf")).hf_config()
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (HIDDEN, LAYERS, HEAD_DIM)
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] is True
