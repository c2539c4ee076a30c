"""Tiny GGUF files the tests write: a model's metadata as llama.cpp's converter writes it, its
tensors in any GGUF type (K-quants as random valid blocks, since gguf cannot encode them), and
transformers models exported the converter's way."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

QType = gguf.GGMLQuantizationType
TINY_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def projections_per_layer() -> int:
    """Packed projections a layer holds: q, k, v, o, gate, up, down apart where the VNNI kernel
    takes them side by side, else qkv, o, gate_up and down fused."""
    from hayate.kernels import native_kernels

    return 7 if hasattr(native_kernels(), "InterleavedWeight") else 4


def encode(values: np.ndarray, qtype: QType) -> np.ndarray:
    """GGUF bytes (or typed array) for fp32 values; K-quants get random blocks (gguf cannot encode them)."""
    if qtype == QType.F32:
        return values.astype(np.float32)
    if qtype == QType.F16:
        return values.astype(np.float16)
    if qtype in (QType.Q4_K, QType.Q6_K):
        return random_blocks(qtype, values.shape[0], values.shape[1], np.random.default_rng(1))
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def random_blocks(qtype: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in `qtype`'s block layout, with finite fp16 scales (random scale bits may be NaN)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scale_offsets = {QType.Q4_K: (0, 2), QType.Q6_K: (type_size - 2,)}.get(qtype, (0, 2))
    for offset in scale_offsets:
        scales = rng.uniform(-2.0, 2.0, size=blocks.shape[0]).astype(np.float16)
        scales[::7] = 0.0
        scales[1::11] = 3e-7  # fp16 subnormal
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_model(path: Path, arch: str, config: dict, tensors: dict[str, tuple[np.ndarray, QType]],
                vocabulary: tuple[list[str], list[int]] | None = None,
                chat_template: str = "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                extra_metadata: dict[str, int | float | bool] | None = None) -> Path:
    """A GGUF file with a model's metadata (as llama.cpp's converter writes it) and the given
    tensors; `vocabulary`: (tokens, token types) of a byte-level BPE without merges;
    `extra_metadata`: more keys ("{arch}." added in front), typed by their values."""
    writer = gguf.GGUFWriter(str(path), arch)
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    if config.get("head_dim") and config["head_dim"] != config["hidden_size"] // heads:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if experts := config.get("num_local_experts") or config.get("num_experts"):   # Mixtral's name, Qwen2-MoE's
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
    for key, value in (extra_metadata or {}).items():
        add = writer.add_bool if isinstance(value, bool) else writer.add_uint32 if isinstance(value, int) else writer.add_float32
        add(f"{arch}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    tokens, token_types = vocabulary or ([f"tok{i}" for i in range(config["vocab_size"])], [1] * config["vocab_size"])
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_chat_template(chat_template)
    for name, (array, qtype) in tensors.items():
        raw_dtype = qtype if array.dtype == np.uint8 else None
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def refuses_without(metadata: dict, tensors: dict, arch: str, name: str) -> None:
    """The checks, given a file's tensors less `name`, refuse it naming that tensor as missing."""
    import re

    import pytest

    from hayate.loading.gguf_checks import GGUFError, check_model

    with pytest.raises(GGUFError, match=f"{re.escape(name)} is missing"):
        check_model(metadata, {n: t for n, t in tensors.items() if n != name}, arch, "tiny.gguf")


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def export_hf_model(path: Path, model: torch.nn.Module, arch: str, qtype: QType = QType.F32,
                    extra: dict[str, tuple[np.ndarray, QType]] | None = None) -> Path:
    """Write a transformers model the way llama.cpp's converter does (names from gguf's own map)."""
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        array = value.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        if arch == "llama" and ".k_proj." in hf_name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        tensor_type = qtype if array.ndim == 2 else QType.F32
        tensors[name] = (encode(array, tensor_type), tensor_type)
    tensors.update(extra or {})
    metadata = {**TINY_CONFIG, **config.to_dict(), "rope_theta": config.rope_parameters["rope_theta"]}
    return write_model(path, arch, metadata, tensors)


def tiny_model(arch: str, **overrides) -> torch.nn.Module:
    import transformers
    config_class = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    model_class = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = model_class(config_class(**{**TINY_CONFIG, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():  # norms start at 1 and biases at 0: make all distinct
            parameter.normal_()
    return model


def load_gguf(path: Path):
    """(model, config) built from a GGUF file with every weight dequantized: the eager reference."""
    from hayate.loading.gguf import GGUFModelFile
    from hayate.models.config import ModelConfig
    from hayate.models.registry import build_model

    source = GGUFModelFile(path)
    config = ModelConfig.from_hf(source.hf_config())
    model = build_model(config, max_positions=256)
    model.load_weights(source.tensors(keep_packed=False))
    return model.eval(), config
