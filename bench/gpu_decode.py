"""Decode speed at batch 1 on a random-weight model of Llama-3-8B's shape, as a fraction of
the device's memory-bandwidth floor: the speed issue's GPU check, ready for a machine with
one (on the CPU it runs a tiny shape, so the tests keep it working).

    .venv/bin/python bench/gpu_decode.py --device cuda [--dtype bfloat16] [--tokens 128] [--hardware h200]
    .venv/bin/python bench/gpu_decode.py --device cpu --shape tiny --tokens 8

It times hayate's eager model step (the one `--device cuda` serves with: fused QKV and
gate/up, the paged KV cache, greedy argmax), after a 32-token prefill; the floor is the
bytes a step reads (every weight once, plus the KV cache) over the datasheet bandwidth."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from hayate.engine.kv_cache import KVCache
from hayate.layers.attention import AttentionMetadata
from hayate.models.config import ModelConfig
from hayate.models.registry import build_model
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


def decode_seconds(model: nn.Module, cache: KVCache, tokens: int, device: torch.device) -> list[float]:
    """Per-step wall time of `tokens` greedy steps after the prompt, one sequence."""
    table = list(range(cache.num_blocks))
    ids = torch.arange(1, PROMPT_TOKENS + 1, device=device)
    meta = AttentionMetadata.build([table], [0], [PROMPT_TOKENS], BLOCK, device)
    token = model.compute_logits(model(ids, meta.positions(), meta)[-1:]).argmax(-1)
    times = []
    for step in range(tokens):
        start = time.perf_counter()
        meta = AttentionMetadata.build([table], [PROMPT_TOKENS + step], [1], BLOCK, device)
        token = model.compute_logits(model(token, meta.positions(), meta)).argmax(-1)
        int(token)   # the host waits for the device, as the engine does for each token
        times.append(time.perf_counter() - start)
    return times


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
        cache = KVCache(model.config, -(-max_positions // BLOCK), BLOCK, dtype=dtype, device=device)
        cache.bind(model)
        times = decode_seconds(model, cache, args.tokens, device)
    report(model, cache, times, args)


def report(model: nn.Module, cache: KVCache, times: list[float], args) -> None:
    step = statistics.median(times)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = cache.bytes_per_token(model.config, cache.storage.dtype) * (PROMPT_TOKENS + args.tokens // 2)
    hardware = datasheet_profiles()[args.hardware]
    floor = (weight_bytes + kv_bytes) / hardware.bandwidth
    print(f"{args.shape} {args.dtype} on {args.device}: {weight_bytes / 1e9:.2f} GB of weights, "
          f"median step {step * 1e3:.2f} ms = {1 / step:.1f} tokens/s at batch 1")
    print(f"floor on {hardware.name} ({hardware.bandwidth / 1e12:.2f} TB/s): {floor * 1e3:.2f} ms a token; "
          f"achieved {floor / step:.0%} of it")


if __name__ == "__main__":
    main()
