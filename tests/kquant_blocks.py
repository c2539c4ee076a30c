"""GGUF blocks of every natively read type for the tests: random valid blocks, and a plain
numpy quantizer for Q4_K / Q5_K / Q6_K (gguf can only decode them; blocks need only be valid,
not optimal), and tiny GGUF models whose tensors mix types as a Q4_K_M file does."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from hayate.layers.quant import HALF_FIELDS
from gguf_files import TINY_CONFIG, QType, llama_cpp_permute, write_model

NEW_TYPES = [QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q5_0, QType.Q5_1]
# Types read through gguf's numpy decoder only: no quantizer here, random valid blocks instead.
DECODED_TYPES = [QType.Q2_K, QType.Q3_K]


def random_blocks(qtype: QType, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random bytes in qtype's layout (every scale packing, Q6_K's int8 scales down to -128)
    with fp16 scale fields of sane magnitude and either sign: uint8 [rows, row bytes]."""
    rng = np.random.default_rng(seed)
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // elements, size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        halves = rng.uniform(1e-3, 1e-1, blocks.shape[:2]) * rng.choice([-1.0, 1.0], blocks.shape[:2])
        blocks[:, :, at:at + 2] = halves.astype(np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
    return torch.from_numpy(blocks.reshape(rows, -1))


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """[n, 8] 6-bit scales and mins -> [n, 12] bytes (gguf's get_scale_min, inverted)."""
    low = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return np.concatenate([low, mid, high], axis=1).astype(np.uint8)


def _quantize_q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K / Q5_K blocks [n, 144 or 176] of x [n, 256]: w = (d sc) q - (dmin m) per 32."""
    n, top = x.shape[0], 2 ** bits - 1
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - low) / top, -low
    d, dmin = _fp16(scale.max(-1) / 63), _fp16(mins.max(-1) / 63)
    sc = np.clip(np.rint(_ratio(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_ratio(mins, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint(_ratio(sub + offset[..., None], np.broadcast_to(step[..., None], sub.shape))), 0, top)
    q = q.astype(np.uint8).reshape(n, 4, 2, 32)   # 64 weights per chunk: low nibbles, high nibbles
    qs = ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(n, 128).astype(np.uint8)
    head = [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), _pack_scales_k4(sc, mn)]
    if bits == 5:   # bit s of qh[l]: bit 4 of weight 32 s + l
        fifth = ((q.reshape(n, 8, 32) >> 4) & 1).astype(np.uint8)
        head.append((fifth << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8))
    return np.concatenate(head + [qs], axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks [n, 210] of x [n, 256]: w = (d sc) (q - 32) per 16, sc int8."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = _fp16(scale.max(-1) / 127)
    sc = np.clip(np.rint(_ratio(scale, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.rint(_ratio(sub, np.broadcast_to(step[..., None], sub.shape))) + 32, 0, 63).astype(np.uint8)
    q = q.reshape(n, 2, 128)
    low = q & 15
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)   # weight 128 h + 32 s + l -> bits 2 s of qh[32 h + l]
    qh = (high << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)


def quantize(values: np.ndarray, qtype: QType) -> np.ndarray:
    """GGUF bytes [rows, row bytes] of fp32 values [rows, cols] in any natively read type
    (random valid blocks of the right shape for DECODED_TYPES)."""
    rows = values.shape[0]
    if qtype in DECODED_TYPES:
        return random_blocks(qtype, rows, values.shape[1], seed=values.size).numpy()
    if qtype in (QType.Q4_K, QType.Q5_K, QType.Q6_K):
        x = values.astype(np.float32).reshape(-1, 256)
        blocks = _quantize_q6_k(x) if qtype == QType.Q6_K else _quantize_q45_k(x, 4 if qtype == QType.Q4_K else 5)
        return blocks.reshape(rows, -1)
    return gguf.quants.quantize(values.astype(np.float32), qtype).reshape(rows, -1)


def export_mixed_model(path: Path, model: torch.nn.Module, arch: str, type_of: Callable[[str], QType]) -> Path:
    """Write a transformers model as llama.cpp's converter does, each 2-D tensor in
    type_of(its GGUF name) (1-D tensors F32); a tied head is not written (the file's
    token_embd serves as the head)."""
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = value.float().numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype = type_of(name) if array.ndim == 2 else QType.F32
        tensors[name] = (array if qtype == QType.F32 else quantize(array, qtype), qtype)
    metadata = {**TINY_CONFIG, **config.to_dict(), "rope_theta": config.rope_parameters["rope_theta"]}
    return write_model(path, arch, metadata, tensors)


# A tiny model whose every row length is a multiple of 256 (K-quants need it).
K_CONFIG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def q4_k_m_type(name: str) -> QType:
    """Types as llama.cpp's Q4_K_M mix assigns them (Q6_K where it wants more bits), with the
    fallback types Q5_0 / Q8_0 / Q5_1 and a Q5_K in the second layer, so one model mixes all."""
    layer1 = {"attn_q": QType.Q5_0, "attn_k": QType.Q4_K, "attn_v": QType.Q8_0, "attn_output": QType.Q5_K,
              "ffn_gate": QType.Q5_1, "ffn_up": QType.Q5_1, "ffn_down": QType.Q5_0}
    if name.startswith("blk.1."):
        return layer1[name.split(".")[2]]
    if name == "output.weight" or name.endswith(("attn_v.weight", "ffn_down.weight")):
        return QType.Q6_K
    return QType.Q4_K
