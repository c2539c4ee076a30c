"""GGUF files: metadata, tensors (packed or dequantized), tokenizer and chat template."""
from __future__ import annotations

import math
import mmap
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from hayate.layers.quant import PackedWeight, QType, can_dequantize, dequantize, is_quantized
from hayate.loading.gguf_checks import QK_NORM_ARCHITECTURES, QKV_BIAS_ARCHITECTURES, GGUFError, check_model, describe
from hayate.loading.gguf_experts import expert_hf_name, expert_settings, held_nbytes
from hayate.loading.gguf_reader import FastReader, read_metadata

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "olmoe", "gemma3", "granite", "granitemoe")
# Architectures whose q/k rows llama.cpp's converter permuted for its interleaved RoPE (Llama's and
# its subclasses': Granite's)
_PERMUTED_QK = ("llama", "granite", "granitemoe")
# Granite's multipliers: GGUF key (under the architecture) -> config.json key
_GRANITE_KEYS = {"embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                 "logit_scale": "logits_scaling", "attention.scale": "attention_multiplier"}
# A GGUF architecture -> Hugging Face's model_type, where the two differ.
_HF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}

# GGUF tensor name -> Hugging Face name; "{i}" is the layer index.
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_QK_NORM_TENSORS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 3 norms around both halves of a layer, and QK-norm; its ffn_norm is the FFN's pre-norm.
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    **_QK_NORM_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp stores llama3 rope scaling as per-frequency factors; hf_config() reads them.
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})
_EMBEDDING = "model.embed_tokens.weight"


# What a mutated header can make the gguf package's reader raise.
_PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, ArithmeticError, MemoryError, RecursionError,
                 struct.error)


class GGUFModelFile:
    """One GGUF model file: its metadata, a Hugging Face style config, and its weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader, self.metadata = open_reader(self.path)
        self.architecture = self.metadata.get("general.architecture", "")
        if self.architecture == "clip":
            raise GGUFError(f"{self.path.name} is an image encoder (mmproj), not a text model: give it as "
                            "--mmproj, beside the text model's GGUF as --model")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{self.path.name} has architecture {describe(self.architecture)}, which hayate "
                            f"does not support (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self._by_name = {tensor.name: tensor for tensor in self.reader.tensors}
        self._hf_names = {t.name: _hf_name(t.name, self.path, self.architecture) for t in self.reader.tensors
                          if t.name not in _SKIPPED_TENSORS}
        check_tensor_types(self.reader.tensors, self.path)

    def __len__(self) -> int:
        return len(self._hf_names)

    def release_pages(self) -> None:
        """Unmap the pages of the file this process has read (they stay in the OS page cache):
        weights rearranged into their own memory stop counting twice; a later read (an
        embedding row) maps its page again. The map is read-only, so nothing is lost."""
        mapping = getattr(self.reader.data, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def hf_config(self) -> dict[str, Any]:
        """The model's settings under the names of a Hugging Face config.json, once the
        metadata and tensor shapes have been checked against each other (GGUFError if not)."""
        check_model(self.metadata, self._by_name, self.architecture, self.path.name)
        heads = int(self._arch_key("attention.head_count"))
        hidden = int(self._arch_key("embedding_length"))
        return {
            "model_type": _HF_MODEL_TYPES.get(self.architecture, self.architecture),
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_key("feed_forward_length")),
            "num_hidden_layers": int(self._arch_key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch_key("attention.head_count_kv", heads)),
            "head_dim": int(self._arch_key("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self._arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._arch_key("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": int(self._arch_key("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self._by_name,
            "attention_bias": self.architecture in QKV_BIAS_ARCHITECTURES or "blk.0.attn_q.bias" in self._by_name,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._eos_token_id(),
            **(self._gemma3_settings(hidden // heads) if self.architecture == "gemma3" else {}),
            **expert_settings(self.metadata, self.architecture, self._by_name),   # Mixtral, Qwen-MoE, OLMoE
            **({"clip_qkv": self._arch_key("attention.clamp_kqv")}   # OLMoE
               if f"{self.architecture}.attention.clamp_kqv" in self.metadata else {}),
            **{hf_key: float(self._arch_key(key)) for key, hf_key in _GRANITE_KEYS.items()   # Granite
               if self.architecture.startswith("granite") and f"{self.architecture}.{key}" in self.metadata},
        }

    def _gemma3_settings(self, default_head_dim: int) -> dict[str, Any]:
        """What llama.cpp's gemma3 graph fixes rather than reads: the local layers' RoPE base,
        q scaled by 1/sqrt(key_length), and norms stored as w + 1 (so no offset to add)."""
        head_dim = int(self._arch_key("attention.key_length", default_head_dim))
        return {"sliding_window": int(self._arch_key("attention.sliding_window")),
                "query_pre_attn_scalar": head_dim, "rope_local_base_freq": 10000.0,
                "norm_weight_offset": 0.0}

    def tensors(self, keep_packed: bool, pack_types: frozenset[int] | None = None,
                pack_embedding: bool = False) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
        """(Hugging Face name, weight) pairs: fp32 tensors, or PackedWeight for quantized
        matrices when keep_packed (only those of `pack_types`, when given; the embedding table
        too when pack_embedding). A model whose head is tied to a packable embedding also gets
        that embedding's blocks as a packed `lm_head.weight`, so the head reads the stored
        bytes too."""
        def packs(ggml_type: int) -> bool:
            return keep_packed and is_quantized(ggml_type) and (pack_types is None or ggml_type in pack_types)

        for tensor in self.reader.tensors:
            if tensor.name in _SKIPPED_TENSORS:
                continue
            hf_name = self._hf_names[tensor.name]
            packed = packs(int(tensor.tensor_type)) and (hf_name != _EMBEDDING or pack_embedding)
            yield hf_name, self._load(tensor, hf_name, packed)
        embedding = self._by_name.get("token_embd.weight")
        if "output.weight" not in self._by_name and embedding is not None and packs(int(embedding.tensor_type)):
            yield "lm_head.weight", self._load(embedding, "lm_head.weight", True)

    def dequantized_nbytes(self) -> int:
        """Bytes all weights take once dequantized to fp32."""
        return sum(4 * int(self._by_name[name].n_elements) for name in self._hf_names)

    def stored_nbytes(self) -> int:
        """Bytes all weights take as stored (packed) in the file; float experts', as fp32 (gguf_experts.py)."""
        return sum(held_nbytes(name, self._by_name[name]) for name in self._hf_names)

    def _load(self, tensor: gguf.ReaderTensor, hf_name: str, keep_packed: bool) -> torch.Tensor | PackedWeight:
        shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))  # torch order
        ggml_type = int(tensor.tensor_type)
        raw = mapped_tensor(tensor.data)
        if hf_name.endswith(".shared_expert_gate.weight"):   # stored as a vector: a [1, hidden] matrix
            shape = (1, shape[-1])
        rows = self._row_order(hf_name, shape[0])
        if keep_packed and len(shape) == 3:   # experts stacked (gguf_experts.py): their rows one after another
            return PackedWeight(raw.view(torch.uint8).reshape(shape[0] * shape[1], -1), ggml_type,
                                (shape[0] * shape[1], shape[2]))
        if keep_packed and len(shape) == 2:
            packed = raw.view(torch.uint8).reshape(shape[0], -1)
            return PackedWeight(packed if rows is None else packed[rows], ggml_type, shape)
        weight = dequantize(raw, ggml_type, shape)
        return weight if rows is None else weight[rows]

    def _row_order(self, hf_name: str, num_rows: int) -> torch.Tensor | None:
        """Row indices undoing llama.cpp's q/k permutation (made for its interleaved RoPE)."""
        if self.architecture not in _PERMUTED_QK or not re.search(r"\.(q|k)_proj\.", hf_name):
            return None
        heads = int(self._arch_key("attention.head_count"))
        if ".k_proj." in hf_name:
            heads = int(self._arch_key("attention.head_count_kv", heads))
        # llama.cpp wrote row (head, pair, half) where Hugging Face has (head, half, pair).
        return torch.arange(num_rows).reshape(heads, num_rows // heads // 2, 2).transpose(1, 2).reshape(-1)

    def _arch_key(self, key: str, default: Any = None) -> Any:
        full_key = f"{self.architecture}.{key}"
        value = self.metadata.get(full_key, default)
        if value is None:
            raise GGUFError(f"{self.path.name} lacks the metadata key '{full_key}'")
        return value

    def _vocab_size(self) -> int:
        if f"{self.architecture}.vocab_size" in self.metadata:
            return int(self.metadata[f"{self.architecture}.vocab_size"])
        if "tokenizer.ggml.tokens" in self.metadata:
            return len(self.metadata["tokenizer.ggml.tokens"])
        return int(self._by_name["token_embd.weight"].shape[-1])

    def _eos_token_id(self) -> int | list[int] | None:
        # Chat models often end a turn with an end-of-turn token distinct from eos; stop on all.
        keys = ("eos_token_id", "eot_token_id", "eom_token_id")
        ids = [self.metadata[f"tokenizer.ggml.{key}"] for key in keys if f"tokenizer.ggml.{key}" in self.metadata]
        ids = list(dict.fromkeys(ids))
        return None if not ids else ids[0] if len(ids) == 1 else ids

    def _rope_scaling(self) -> dict[str, Any] | None:
        if "rope_freqs.weight" in self._by_name:
            factors = np.asarray(self._by_name["rope_freqs.weight"].data, dtype=np.float64)
            return llama3_rope_scaling(factors, float(self._arch_key("rope.freq_base", 10000.0)), self.path)
        kind = self.metadata.get(f"{self.architecture}.rope.scaling.type")
        if kind in (None, "none"):
            return None
        scaling = {"rope_type": kind, "factor": float(self._arch_key("rope.scaling.factor", 1.0))}
        original_context = self.metadata.get(f"{self.architecture}.rope.scaling.original_context_length")
        if original_context:
            scaling["original_max_position_embeddings"] = int(original_context)
        return scaling


def llama3_rope_scaling(factors: np.ndarray, rope_theta: float, path: Path) -> dict[str, Any] | None:
    """Hugging Face's llama3 rope parameters recovered from llama.cpp's per-frequency factors."""
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    dim = 2 * len(factors)
    wavelength = 2 * np.pi * rope_theta ** (np.arange(0, dim, 2) / dim)
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    low, high, original_context = 1.0, 4.0, 8192.0  # the Llama 3.x values
    unreadable = GGUFError(f"{path.name} has llama3 rope frequencies hayate cannot interpret")
    # Hostile factors make a degenerate fit: refused below, without numpy's warnings on stderr.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if medium.sum() >= 2:
            # smooth = (original_context / wavelength - low) / (high - low), linear in 1 / wavelength;
            # only the factors matter, so fixing low = 1 loses nothing.
            smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
            try:
                slope, intercept = np.polyfit(1 / wavelength[medium], smooth, 1)
            except np.linalg.LinAlgError:
                raise unreadable from None
            high, original_context = 1 - 1 / intercept, -slope / intercept
        if not (math.isfinite(high) and high > low and 1 <= original_context < 2 ** 31):
            raise unreadable
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": round(float(high), 4),
                   "original_max_position_embeddings": int(round(original_context))}
        if not np.allclose(llama3_rope_factors(scaling, rope_theta, dim), factors, rtol=1e-3):
            raise unreadable
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], rope_theta: float, dim: int) -> np.ndarray:
    """The factors llama.cpp's converter stores in rope_freqs.weight (one per frequency pair)."""
    low_wavelength = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelength = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    wavelength = 2 * np.pi * rope_theta ** (np.arange(0, dim, 2) / dim)
    smooth = (scaling["original_max_position_embeddings"] / wavelength - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"])
    medium = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    return np.where(wavelength < high_wavelength, 1.0,
                    np.where(wavelength > low_wavelength, scaling["factor"], medium))


def open_reader(path: Path) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    """The file's reader and metadata; any parse failure is one GGUFError."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    with path.open("rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = FastReader(path)
        return reader, read_metadata(reader)
    except _PARSE_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise GGUFError(f"{path} is truncated or corrupt ({reason})") from None


def mapped_tensor(data: np.ndarray) -> torch.Tensor:
    """The tensor's bytes in the file's memory map, not copied: a packed weight is read from
    the page cache (or rearranged from it once); decoding and loading make their own copies.
    Never written to: the map is read-only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data)


def _hf_name(gguf_name: str, path: Path, architecture: str) -> str:
    if (expert_name := expert_hf_name(gguf_name)) is not None:   # experts, routers, shared experts
        return expert_name
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS and suffix in ("weight", "bias"):
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    match = re.fullmatch(r"blk\.(0|[1-9]\d{0,8})\.(\w+)", stem)
    layer_tensors = _GEMMA3_LAYER_TENSORS if architecture == "gemma3" else (
        {**_LAYER_TENSORS, **_QK_NORM_TENSORS} if architecture in QK_NORM_ARCHITECTURES else _LAYER_TENSORS)
    if match and match[2] in layer_tensors and suffix in ("weight", "bias"):
        return f"model.layers.{match[1]}.{layer_tensors[match[2]]}.{suffix}"
    raise GGUFError(f"{path.name} has a tensor hayate does not know: '{gguf_name}'")


def check_tensor_types(tensors: list[gguf.ReaderTensor], path: Path) -> None:
    for ggml_type in {int(tensor.tensor_type) for tensor in tensors}:
        if not can_dequantize(ggml_type):
            raise GGUFError(f"{path.name} uses tensor type {QType(ggml_type).name}, which hayate cannot decode")
