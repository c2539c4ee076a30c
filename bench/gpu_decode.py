"""Decode speed at batch 1 on a random-weight model of Llama-3-8B's shape, as a fraction of
the device's memory-bandwidth floor: the speed issue's GPU check, ready for a machine with
one (on the CPU it runs a tiny shape, so the tests keep it working).

    .venv/bin/python bench/gpu_decode.py --device cuda [--tokens 128] [--hardware h200]
    .venv/bin/python bench/gpu_decode.py --device cpu --shape tiny --tokens 8

One run times three ways of stepping, each after a 32-token prefill and against its own
floor (the bytes a step reads: every weight it multiplies by, in the form it holds them,
plus the KV cache, over the datasheet bandwidth):
- eager: the bf16 model step as `--enforce-eager` serves it (fused QKV and gate/up, the
  paged KV cache, greedy argmax);
- graphs: the same step as hayate serves it on CUDA, replayed from a captured CUDA graph
  (hayate/engine/static_decode.py; uncaptured on the CPU);
- int4: every projection as packed int4 (tinygemm on CUDA; random Q4_0 blocks), graphs.
Each way's greedy tokens are counted against the eager ones: graphs must match eager.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from hayate.engine.kv_cache import KVCache
from hayate.engine.static_decode import StaticDecode
from hayate.layers.attention import AttentionMetadata
from hayate.layers.fast_linear import Int4Linear
from hayate.layers.quant import PackedWeight, QType
from hayate.models.config import ModelConfig
from hayate.models.registry import build_model
from hayate.plan.cost import decode_cost
from hayate.plan.hardware import datasheet_profiles

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}
PROMPT_TOKENS = 32
BLOCK = 16


def random_model(shape: str, device: torch.device, dtype: torch.dtype, max_positions: int) -> nn.Module:
    """Built on the meta device, then each parameter made on `device` with random values
    (no fp32 copy of 8B weights on the host); q/k/v and gate/up fused as at load."""
    config = ModelConfig(model_type="llama", **SHAPES[shape], max_position_embeddings=max_positions)
    with torch.device("meta"):
        model = build_model(config, max_positions=max_positions)
    generator = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                value = torch.empty(param.shape, device=device, dtype=dtype)
                value.normal_(0.0, 0.02, generator=generator) if param.dim() > 1 else value.fill_(1.0)
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
    model.to(device)   # the rotary tables, built on the CPU
    for layer in model.model.layers:
        layer.self_attn.fuse()
        layer.mlp.fuse()
    return model.eval()


def int4_projections(model: nn.Module, device: torch.device) -> None:
    """Every linear layer replaced by packed int4 made from random Q4_0 blocks (scale 2^-7)."""
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([2.0 ** -7], dtype=torch.float16).view(torch.uint8)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        out_features, in_features = module.weight.shape
        blocks = torch.randint(0, 256, (out_features * in_features // 32, 18), dtype=torch.uint8, generator=generator)
        blocks[:, :2] = scale
        weight = PackedWeight(blocks.reshape(out_features, -1), int(QType.Q4_0), (out_features, in_features))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int4Linear(weight, device=device))


def prefill(model: nn.Module, table: list[int], device: torch.device) -> int:
    """The prompt's step; its greedy next token."""
    ids = torch.arange(1, PROMPT_TOKENS + 1, device=device)
    meta = AttentionMetadata.build([table], [0], [PROMPT_TOKENS], BLOCK, device)
    return int(model.compute_logits(model(ids, meta.positions(), meta)[-1:]).argmax(-1))


def eager_steps(model: nn.Module, cache: KVCache, tokens: int, device: torch.device) -> tuple[list[float], list[int]]:
    """Per-step wall time and greedy token of `tokens` eager steps after the prompt."""
    table = list(range(cache.num_blocks - 1))   # the last block: the static step's scratch
    token, times, out = prefill(model, table, device), [], []
    for step in range(tokens):
        start = time.perf_counter()
        meta = AttentionMetadata.build([table], [PROMPT_TOKENS + step], [1], BLOCK, device)
        ids = torch.tensor([token], device=device)
        token = int(model.compute_logits(model(ids, meta.positions(), meta)).argmax(-1))   # the host waits, as the engine does
        times.append(time.perf_counter() - start)
        out.append(token)
    return times, out


def static_steps(model: nn.Module, cache: KVCache, tokens: int, device: torch.device) -> tuple[list[float], list[int]]:
    """The same steps through the fixed-shape step, captured as a CUDA graph on CUDA."""
    table = list(range(cache.num_blocks - 1))
    start = time.perf_counter()
    static = StaticDecode(model, cache, cache.num_blocks - 1, max_batch=1, max_len=PROMPT_TOKENS + tokens,
                          capture=device.type == "cuda")
    print(f"  set up (capture) in {time.perf_counter() - start:.2f} s: {len(static.steps)} bucket(s)")
    token, times, out = prefill(model, table, device), [], []
    for step in range(tokens):
        start = time.perf_counter()
        token = int(static.run([token], [PROMPT_TOKENS + step], [table]).argmax(-1)[0])
        times.append(time.perf_counter() - start)
        out.append(token)
    return times, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hardware", default="h200", choices=sorted(datasheet_profiles()))
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    max_positions = PROMPT_TOKENS + args.tokens + BLOCK
    with torch.inference_mode():
        model = random_model(args.shape, device, dtype, max_positions)
        cache = KVCache(model.config, -(-max_positions // BLOCK) + 1, BLOCK, dtype=dtype, device=device)
        cache.bind(model)
        eager = eager_steps(model, cache, args.tokens, device)
        report("eager", model, cache, *eager, None, args)
        report("graphs", model, cache, *static_steps(model, cache, args.tokens, device), eager[1], args)
        int4_projections(model, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report("int4 + graphs", model, cache, *static_steps(model, cache, args.tokens, device), None, args)


def report(way: str, model: nn.Module, cache: KVCache, times: list[float], tokens: list[int],
           eager_tokens: list[int] | None, args) -> None:
    step = statistics.median(times)
    context = PROMPT_TOKENS + args.tokens // 2
    cost = decode_cost(model, model.config, 1, context, kv_bytes=cache.element_size)
    hardware = datasheet_profiles()[args.hardware]
    floor = cost.bytes / hardware.bandwidth
    same = "" if eager_tokens is None else \
        f"; greedy tokens as eager: {sum(a == b for a, b in zip(tokens, eager_tokens))}/{len(tokens)}"
    print(f"{args.shape} {args.dtype} {way} on {args.device}: {cost.bytes / 1e9:.2f} GB read a step, "
          f"median step {step * 1e3:.2f} ms = {1 / step:.1f} tokens/s at batch 1 (p99 "
          f"{sorted(times)[int(0.99 * (len(times) - 1))] * 1e3:.2f} ms){same}")
    print(f"  floor on {hardware.name} ({hardware.bandwidth / 1e12:.2f} TB/s): {floor * 1e3:.2f} ms a token; "
          f"achieved {floor / step:.0%} of it")


if __name__ == "__main__":
    main()
