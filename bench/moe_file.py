"""Writes a Mixtral-shaped GGUF file of random weights, for timing a mixture of experts against
llama.cpp on the same file (no real MoE file ships on the package registry, and these machines
cannot download one). As llama.cpp's converter writes a Mixtral: architecture `llama` with
`expert_count`, routers F32, experts stacked into `ffn_*_exps`; the experts and attention in
--type (Q4_K as a Q4_K_M file has them, through the tests' numpy quantizer), the head Q6_K,
the embedding Q8_0; the default model's tokenizer (49152 tokens), so every engine can encode
the bench's prompts. The weights are random (std 0.02): the answers mean nothing, the speed does.

    .venv/bin/python bench/moe_file.py /tmp/moe.gguf [--shape granite|olmoe] [--hidden 1536] [--inner 4096]
        [--layers 8] [--experts 8] [--used 2] [--type Q4_K]
    .venv/bin/hayate bench --model /tmp/moe.gguf --threads 2 --prompt-lengths 32,512 \\
        --decode-tokens 128 --compare llama.cpp"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

# the shapes of real small mixtures (their config.json files), as --shape; flags given override them
SHAPES = {
    "granite": dict(hidden=1024, inner=512, layers=24, heads=16, kv_heads=8, experts=32, used=8),   # granite-3.0-1b-a400m
    "olmoe": dict(hidden=2048, inner=1024, layers=16, heads=16, kv_heads=16, experts=64, used=8),    # OLMoE-1B-7B
}

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kquant_blocks import quantize  # noqa: E402  (any native type: K-quants by numpy, the rest by gguf)

from hayate.loading.gguf import GGUFModelFile  # noqa: E402
from hayate.loading.loader import default_model_path  # noqa: E402

QType = gguf.GGMLQuantizationType
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.chat_template")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--shape", choices=SHAPES, help="a real small mixture's shape (default: Mixtral-like)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--inner", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--used", type=int)
    parser.add_argument("--type", default="Q4_K", choices=["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0"])
    args = parser.parse_args()
    mixtral_like = dict(hidden=1536, inner=4096, layers=8, heads=16, kv_heads=4, experts=8, used=2)
    for key, value in SHAPES.get(args.shape, mixtral_like).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    qtype = QType[args.type]
    tokenizer = GGUFModelFile(default_model_path()).metadata
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(0)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(args.path, "llama")
    head_dim = args.hidden // args.heads
    for add, value in ((writer.add_block_count, args.layers), (writer.add_context_length, 4096),
                       (writer.add_embedding_length, args.hidden), (writer.add_feed_forward_length, args.inner),
                       (writer.add_head_count, args.heads), (writer.add_head_count_kv, args.kv_heads),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_rope_freq_base, 1e6),
                       (writer.add_rope_dimension_count, head_dim), (writer.add_expert_count, args.experts),
                       (writer.add_expert_used_count, args.used), (writer.add_file_type, 15)):
        add(value)
    for key in TOKENIZER_KEYS:
        if key in tokenizer:
            writer.add_key_value(key, tokenizer[key], _value_type(tokenizer[key]),
                                 sub_type=gguf.GGUFValueType.STRING if key.endswith(("tokens", "merges")) else
                                 gguf.GGUFValueType.INT32 if key.endswith("token_type") else None)

    def add(name: str, values: np.ndarray, kind: QType) -> None:
        if kind == QType.F32:
            writer.add_tensor(name, values)
            return
        blocks = np.asarray(quantize(values.reshape(-1, values.shape[-1]), kind), dtype=np.uint8)
        writer.add_tensor(name, blocks.reshape(*values.shape[:-1], -1), raw_dtype=kind)

    add("token_embd.weight", weights(vocab, args.hidden), QType.Q8_0)
    add("output_norm.weight", np.ones(args.hidden, np.float32), QType.F32)
    add("output.weight", weights(vocab, args.hidden), QType.Q6_K)
    kv = args.kv_heads * head_dim
    for layer in range(args.layers):
        print(f"layer {layer + 1}/{args.layers}", file=sys.stderr)
        blk = f"blk.{layer}."
        add(blk + "attn_norm.weight", np.ones(args.hidden, np.float32), QType.F32)
        add(blk + "ffn_norm.weight", np.ones(args.hidden, np.float32), QType.F32)
        for name, rows in (("attn_q", args.hidden), ("attn_k", kv), ("attn_v", kv), ("attn_output", args.hidden)):
            add(blk + name + ".weight", weights(rows, args.hidden), qtype)
        add(blk + "ffn_gate_inp.weight", weights(args.experts, args.hidden), QType.F32)
        add(blk + "ffn_gate_exps.weight", weights(args.experts, args.inner, args.hidden), qtype)
        add(blk + "ffn_up_exps.weight", weights(args.experts, args.inner, args.hidden), qtype)
        add(blk + "ffn_down_exps.weight", weights(args.experts, args.hidden, args.inner), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.path} ({Path(args.path).stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
    return 0


def _value_type(value) -> gguf.GGUFValueType:
    if isinstance(value, list):
        return gguf.GGUFValueType.ARRAY
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.UINT32


if __name__ == "__main__":
    sys.exit(main())
