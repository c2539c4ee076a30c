"""Checks that a GGUF file describes a model hayate can build, run before anything is built
or allocated: every failure is one GGUFError naming the key (or tensor) and its bad value."""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import gguf
import numpy as np

from hayate.layers.rotary import MAX_POSITIONS as MAX_CONTEXT   # a longer context_length is corrupt
from hayate.loading.gguf_experts import with_experts

MAX_ARRAY_ELEMENTS = 2 ** 20     # per metadata array (the largest vocabularies hold ~262k tokens)
MAX_TENSOR_DIMS = 4              # GGML_MAX_DIMS
TOKENIZER_MODELS = ("gpt2", "llama")
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "unknown_token_id")
_LAYER_NAME = re.compile(r"blk\.(\d{1,9})\.")
# Architectures whose attention normalises queries and keys (Gemma 3's norms are listed apart).
QK_NORM_ARCHITECTURES = ("qwen3", "qwen3moe", "olmoe")
# Architectures with q/k/v biases in every file.
QKV_BIAS_ARCHITECTURES = ("qwen2", "qwen2moe")


class GGUFError(ValueError):
    """A GGUF file hayate cannot use; the message is one sentence for the user, on one line
    whatever names and values from the file it quotes."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """`text` with control characters (newlines from a file's strings) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def describe(value: Any) -> str:
    """A value as an error message shows it: arrays by their length, long text cut short."""
    if isinstance(value, list):
        return f"an array of {len(value)} elements"
    text = repr(value[:60] if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return is_integer(value) or isinstance(value, (float, np.floating))


# ---- the tensor table (checked while the file is parsed, before any tensor data is viewed) ------

def check_tensor_info(name: str, dims: list[int], raw_type: int, offset: int,
                      data_start: int, file_size: int) -> None:
    """One tensor's entry: 1 to 4 non-zero dimensions, a known type whose blocks fill its rows,
    and data that lies inside the file. Raises ValueError (the reader calls the file corrupt)."""
    if not 1 <= len(dims) <= MAX_TENSOR_DIMS:
        raise ValueError(f"tensor {name} has {len(dims)} dimensions (1 to {MAX_TENSOR_DIMS} allowed)")
    if 0 in dims:
        raise ValueError(f"tensor {name} has size zero (dimensions {dims})")
    try:
        qtype = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
        raise ValueError(f"tensor {name} has unknown type {raw_type}") from None
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if dims[0] % block_size:
        raise ValueError(f"tensor {name} has rows of {dims[0]} values, not whole {qtype.name} blocks of {block_size}")
    start = data_start + offset
    end = start + math.prod(dims) // block_size * type_size
    if end > file_size:
        raise ValueError(f"tensor {name}'s data (bytes {start} to {end}) runs past the end of the file "
                         f"({file_size} bytes)")


def check_array_length(count: int, item_bytes: int, remaining: int, offset: int) -> None:
    """A metadata array's element count against the bytes left, before anything is allocated."""
    if count > MAX_ARRAY_ELEMENTS:
        raise ValueError(f"the array at byte {offset} claims {count} elements (at most {MAX_ARRAY_ELEMENTS})")
    if count * item_bytes > remaining:
        raise ValueError(f"the array at byte {offset} claims {count} elements, more than the file holds")


# ---- metadata -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    """The sizes a file's metadata gives, after checking them against each other."""
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


class Metadata:
    """Typed reads of one file's metadata; each bad value raises a GGUFError naming its key."""

    def __init__(self, metadata: Mapping[str, Any], architecture: str, source: str):
        self.values, self.architecture, self.source = metadata, architecture, source

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.source}: {message}")

    def key(self, name: str) -> str:
        return f"{self.architecture}.{name}"

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        if required and key not in self.values:
            raise self.fail(f"the metadata key '{key}' is missing")
        return self.values.get(key, default)

    def integer(self, key: str, default: int | None = None, required: bool = False,
                maximum: int | None = None) -> int | None:
        value = self.get(key, default, required)
        if value is not None and (not is_integer(value) or value <= 0):
            raise self.fail(f"{key} must be a positive integer, got {describe(value)}")
        if value is not None and maximum is not None and value > maximum:
            raise self.fail(f"{key} is {value}, more than hayate accepts ({maximum})")
        return None if value is None else int(value)

    def number(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if not is_number(value) or not math.isfinite(value) or value <= 0:
            raise self.fail(f"{key} must be a positive number, got {describe(value)}")
        return float(value)

    def typed(self, key: str, kind: type, what: str) -> Any:
        value = self.values.get(key)
        if value is not None and not isinstance(value, kind):
            raise self.fail(f"{key} must be {what}, got {describe(value)}")
        return value


def check_model(metadata: Mapping[str, Any], tensors: Mapping[str, Any], architecture: str,
                source: str) -> ModelDims:
    """Every key hf_config() reads, and every tensor the model will load, against each other."""
    meta = Metadata(metadata, architecture, source)
    dims = _dims(meta, tensors)
    meta.integer(meta.key("context_length"), required=False, maximum=MAX_CONTEXT)
    meta.number(meta.key("attention.layer_norm_rms_epsilon"), 1e-6)
    meta.number(meta.key("rope.freq_base"), 10000.0)
    _check_rope(meta, tensors, dims.head_dim)
    if architecture == "gemma3":
        meta.integer(meta.key("attention.sliding_window"), required=True, maximum=MAX_CONTEXT)
    if meta.get(meta.key("attention.clamp_kqv")) is not None:   # OLMoE's clip_qkv
        meta.number(meta.key("attention.clamp_kqv"), 1.0)
    meta.typed(meta.key("expert_weights_norm"), bool, "true or false")
    if architecture.startswith("granite"):   # its multipliers
        for key in ("embedding_scale", "residual_scale", "logit_scale", "attention.scale"):
            meta.number(meta.key(key), 1.0)
    _check_tensors(meta, tensors, dims)
    check_tokenizer_metadata(metadata, dims.vocab, source)
    return dims


def _dims(meta: Metadata, tensors: Mapping[str, Any]) -> ModelDims:
    hidden_key, heads_key = meta.key("embedding_length"), meta.key("attention.head_count")
    hidden, heads = meta.integer(hidden_key, required=True), meta.integer(heads_key, required=True)
    kv_key = meta.key("attention.head_count_kv")
    kv_heads = meta.integer(kv_key, default=heads)
    if heads % kv_heads:
        raise meta.fail(f"{kv_key} {kv_heads} does not divide {heads_key} {heads}")
    head_dim = meta.integer(meta.key("attention.key_length"))
    if head_dim is None and hidden % heads:
        raise meta.fail(f"{heads_key} {heads} does not divide {hidden_key} {hidden}")
    source = (f"{meta.key('attention.key_length')} = {head_dim}" if head_dim else
              f"{hidden_key} / {heads_key} = {hidden} / {heads}")
    _check_head_dim(meta, head_dim or hidden // heads, source)
    head_dim = head_dim or hidden // heads
    return ModelDims(vocab=_vocab_size(meta, tensors), hidden=hidden,
                     ffn=meta.integer(meta.key("feed_forward_length"), required=True),
                     layers=meta.integer(meta.key("block_count"), required=True),
                     heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def _check_head_dim(meta: Metadata, head_dim: int, source: str) -> None:
    if head_dim % 2:
        raise meta.fail(f"the head size {source} must be even (rotary embeddings turn pairs of values)")
    for name in ("attention.value_length", "rope.dimension_count"):
        value = meta.integer(meta.key(name), default=head_dim)
        if value != head_dim:
            raise meta.fail(f"{meta.key(name)} is {value}, but hayate needs it to equal the head size "
                            f"({source})")


def _vocab_size(meta: Metadata, tensors: Mapping[str, Any]) -> int:
    embedding = tensors.get("token_embd.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise meta.fail("the token embedding tensor token_embd.weight is missing or not a matrix")
    vocab = int(embedding.shape[1])  # GGUF lists dimensions innermost first: [hidden, vocab]
    key = meta.key("vocab_size")
    if meta.integer(key, default=vocab) != vocab:
        raise meta.fail(f"{key} is {meta.get(key)}, but token_embd.weight has {vocab} rows")
    return vocab


def _check_rope(meta: Metadata, tensors: Mapping[str, Any], head_dim: int) -> None:
    key = meta.key("rope.scaling.type")
    kind = meta.typed(key, str, "a string")
    freqs = tensors.get("rope_freqs.weight")
    if kind == "llama3" and freqs is None:
        raise meta.fail(f"{key} is 'llama3', but the rope_freqs.weight tensor that holds its factors is missing")
    if kind not in (None, "none", "linear", "llama3"):
        raise meta.fail(f"{key} is {describe(kind)}, which hayate does not support (supported: none, linear, llama3)")
    if kind == "linear":
        meta.number(meta.key("rope.scaling.factor"), 1.0)
        meta.integer(meta.key("rope.scaling.original_context_length"))
    if freqs is not None:
        _check_rope_factors(meta, freqs, head_dim)


def _check_rope_factors(meta: Metadata, freqs: Any, head_dim: int) -> None:
    shape = tuple(int(d) for d in freqs.shape)
    if shape != (head_dim // 2,) or freqs.tensor_type not in (gguf.GGMLQuantizationType.F32,
                                                                 gguf.GGMLQuantizationType.F16):
        raise meta.fail(f"rope_freqs.weight must hold {head_dim // 2} float factors, got shape {shape} "
                        f"of type {freqs.tensor_type.name}")
    factors = np.asarray(freqs.data, dtype=np.float64)
    if not (np.isfinite(factors).all() and (factors > 0).all()):
        raise meta.fail("rope_freqs.weight holds factors that are not positive finite numbers")


# ---- tensor shapes --------------------------------------------------------------------------

def _layer_shapes(dims: ModelDims, meta: Metadata) -> list[tuple[str, tuple[int, ...], str]]:
    """(tensor, torch-order shape, the keys that imply it) for one layer's weights."""
    def keys(*names: str) -> str:
        values = {"embedding_length": dims.hidden, "feed_forward_length": dims.ffn,
                  "attention.head_count": dims.heads, "attention.head_count_kv": dims.kv_heads,
                  "attention.key_length": dims.head_dim}
        return ", ".join(f"{meta.key(name)}={values[name]}" for name in names)

    hidden, q_rows, kv_rows = dims.hidden, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    attention = ("embedding_length", "attention.head_count", "attention.key_length")
    kv = ("embedding_length", "attention.head_count_kv", "attention.key_length")
    ffn = ("embedding_length", "feed_forward_length")
    # Gemma 3 adds QK-norm and norms after attention and after the FFN (its ffn_norm is the FFN's pre-norm).
    gemma3 = [("attn_q_norm", (dims.head_dim,), keys("attention.key_length")),
              ("attn_k_norm", (dims.head_dim,), keys("attention.key_length")),
              ("post_attention_norm", (hidden,), keys("embedding_length")),
              ("post_ffw_norm", (hidden,), keys("embedding_length"))]
    # Qwen3 normalises each head of q and k, OLMoE the whole projections.
    whole = meta.architecture == "olmoe"
    qk_norm = [("attn_q_norm", (q_rows if whole else dims.head_dim,), keys(*attention)),
               ("attn_k_norm", (kv_rows if whole else dims.head_dim,), keys(*kv))]
    extra = gemma3 if meta.architecture == "gemma3" else qk_norm if meta.architecture in QK_NORM_ARCHITECTURES else []
    return extra + [
        ("attn_norm", (hidden,), keys("embedding_length")),
        ("ffn_norm", (hidden,), keys("embedding_length")),
        ("attn_q", (q_rows, hidden), keys(*attention)),
        ("attn_k", (kv_rows, hidden), keys(*kv)),
        ("attn_v", (kv_rows, hidden), keys(*kv)),
        ("attn_output", (hidden, q_rows), keys(*attention)),
        ("ffn_gate", (dims.ffn, hidden), keys(*ffn)),
        ("ffn_up", (dims.ffn, hidden), keys(*ffn)),
        ("ffn_down", (hidden, dims.ffn), keys(*ffn))]


def _check_tensors(meta: Metadata, tensors: Mapping[str, Any], dims: ModelDims) -> None:
    """Each tensor the model loads has the shape the metadata implies; none is missing or extra."""
    _check_layer_count(meta, tensors, dims.layers)
    expected = _expected_tensors(meta, tensors, dims)
    for name, (shape, keys, required) in expected.items():
        check_shape(meta, tensors, name, shape, keys, required)
    extra = next((name for name in tensors if name not in expected and name != "rope_freqs.weight"), None)
    if extra is not None:
        raise meta.fail(f"the tensor {extra} has no place in this {meta.architecture} model")


def _expected_tensors(meta: Metadata, tensors: Mapping[str, Any],
                      dims: ModelDims) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """name -> (torch-order shape, the keys that imply it, whether it must be present)."""
    hidden_key = f"{meta.key('embedding_length')}={dims.hidden}"
    expected = {"token_embd.weight": ((dims.vocab, dims.hidden), hidden_key, True),
                "output_norm.weight": ((dims.hidden,), hidden_key, True),
                "output.weight": ((dims.vocab, dims.hidden), hidden_key, False)}
    # Qwen2 has q/k/v biases; a Llama file has them (and one on o_proj) or none at all.
    biased = meta.architecture in QKV_BIAS_ARCHITECTURES or "blk.0.attn_q.bias" in tensors
    biases = {"attn_q", "attn_k", "attn_v"} | ({"attn_output"} if meta.architecture == "llama" else set())
    shapes = _layer_shapes(dims, meta)
    for layer in range(dims.layers):   # as many as the file has layers: checked before
        for part, shape, keys in shapes:
            expected[f"blk.{layer}.{part}.weight"] = (shape, keys, True)
            if biased and part in biases:
                expected[f"blk.{layer}.{part}.bias"] = (shape[:1], keys, True)
    return with_experts(meta, tensors, dims, expected)   # a Mixtral file's experts for its FFN


def _check_layer_count(meta: Metadata, tensors: Mapping[str, Any], layers: int) -> None:
    indices = {int(match[1]) for name in tensors if (match := _LAYER_NAME.match(name))}
    if len(indices) == layers and max(indices, default=-1) == layers - 1:
        return   # exactly layers 0 .. layers - 1
    found = "no layers" if not indices else f"{len(indices)} layers, numbered up to {max(indices)}"
    raise meta.fail(f"{meta.key('block_count')} is {layers}, but the file has tensors for {found}")


def check_shape(meta: Metadata, tensors: Mapping[str, Any], name: str, expected: tuple[int, ...],
                keys: str, required: bool = True) -> None:
    tensor = tensors.get(name)
    if tensor is None:
        if required:
            raise meta.fail(f"the tensor {name} is missing")
        return
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # torch order
    if shape != expected:
        raise meta.fail(f"tensor {name} has shape {shape}, but {keys} imply {expected}")


# ---- the tokenizer's keys -------------------------------------------------------------------

def check_tokenizer_metadata(metadata: Mapping[str, Any], vocab_size: int | None = None,
                             source: str = "GGUF metadata") -> None:
    """tokenizer.ggml.*: arrays of the right element types and lengths, merges of the form
    "a b", special token ids inside the vocabulary."""
    meta = Metadata(metadata, "", source)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise meta.fail("there is no tokenizer (tokenizer.ggml.tokens is missing)")
    _check_array(meta, "tokenizer.ggml.tokens", lambda token: isinstance(token, str), "strings", types={str})
    if vocab_size is not None and len(tokens) != vocab_size:
        raise meta.fail(f"tokenizer.ggml.tokens has {len(tokens)} tokens, but token_embd.weight has {vocab_size} rows")
    kind = meta.get("tokenizer.ggml.model", required=True)
    if kind not in TOKENIZER_MODELS:
        raise meta.fail(f"tokenizer.ggml.model {describe(kind)} is not supported (hayate reads "
                        f"{' and '.join(TOKENIZER_MODELS)})")
    _check_array(meta, "tokenizer.ggml.token_type", is_integer, "integers", len(tokens), types={int})
    _check_array(meta, "tokenizer.ggml.scores", is_number, "numbers", len(tokens), types={int, float})
    _check_array(meta, "tokenizer.ggml.merges", is_merge, 'strings of the form "a b"', types={str})
    for key in SPECIAL_TOKEN_KEYS:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not (is_integer(token_id) and 0 <= token_id < len(tokens)):
            raise meta.fail(f"tokenizer.ggml.{key} must be a token id (0 to {len(tokens) - 1}), got {describe(token_id)}")
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        meta.typed(f"tokenizer.ggml.{key}", bool, "true or false")
    meta.typed("tokenizer.ggml.pre", str, "a string")
    meta.typed("tokenizer.chat_template", str, "a string")


def _plain_merges(merges: list[str]) -> bool:
    """is_merge() of every one of these strings, at C speed: one space each, at neither end."""
    space = itertools.repeat(" ")
    return (set(map(str.count, merges, space)) <= {1} and not any(map(str.startswith, merges, space))
            and not any(map(str.endswith, merges, space)))


def is_merge(merge: Any) -> bool:
    """A BPE merge as GGUF stores it: two non-empty pieces joined by one space."""
    if not isinstance(merge, str):
        return False
    left, space, right = merge.partition(" ")
    return bool(space and left and right) and " " not in right


def _check_array(meta: Metadata, key: str, valid: Any, what: str, length: int | None = None,
                 types: set[type] = frozenset()) -> None:
    """Every element valid(); `types`: exact element types that are valid as such (and, for
    merges, pieces checked at C speed), so a 150k-token vocabulary is not checked one by one in
    Python unless something is wrong (then the first bad element is named)."""
    values = meta.values.get(key)
    if values is None:
        return
    if not isinstance(values, list):
        raise meta.fail(f"{key} must be an array of {what}, got {describe(values)}")
    fast = bool(types) and set(map(type, values)) <= types and (valid is not is_merge or _plain_merges(values))
    bad = None if fast else next((i for i, value in enumerate(values) if not valid(value)), None)
    if bad is not None:
        raise meta.fail(f"{key} must be an array of {what}, but element {bad} is {describe(values[bad])}")
    if length is not None and len(values) != length:
        raise meta.fail(f"{key} has {len(values)} elements, but there are {length} tokens")
