"""The fixed cost a decode step pays on top of its bytes and FLOPs: operator dispatch,
module calls, scheduling, sampling and detokenizing.

At batch 1 a small model's step is hundreds of tiny calls whose cost does not depend on the
weights' size. The plan measures it on a twin of the model: the same layers, heads and
weight format, with every matrix shrunk until its bytes and FLOPs are negligible, run
through the real engine. What the twin's step takes is what the real step pays beyond the
roofline."""
from __future__ import annotations

import dataclasses
import statistics
import time

import gguf
import numpy as np
import torch
from torch import nn

from hayate.config import EngineConfig
from hayate.layers.linear import PackedLinear
from hayate.layers.moe import SparseMoE
from hayate.layers.quant import PackedWeight, QType
from hayate.loading.loader import LoadedModel
from hayate.models.config import ModelConfig
from hayate.models.registry import build_model
from hayate.sampling import SamplingParams

TWIN_HEAD_DIM = 32
TWIN_VOCAB = 256
TWIN_EXPERT_INNER = 32


def twin_config(config: ModelConfig) -> ModelConfig:
    """Same layers, heads and experts, head_dim 32, a 256-token vocabulary, experts of 32 (one
    block): almost no bytes. (Experts as wide as the twin's hidden size made a 32-expert,
    24-layer twin read ~85 MB a step, a third of the real Granite-shaped step, counted twice.)
    A vision model's twin is its text model alone: decode steps never run the vision encoder."""
    hidden = config.num_attention_heads * TWIN_HEAD_DIM
    experts = dict(moe_intermediate_size=TWIN_EXPERT_INNER if config.num_local_experts else 0,
                   shared_expert_intermediate_size=TWIN_EXPERT_INNER if config.shared_expert_intermediate_size else 0)
    return dataclasses.replace(config, hidden_size=hidden, intermediate_size=hidden, head_dim=TWIN_HEAD_DIM, **experts,
                               vocab_size=TWIN_VOCAB, rope_scaling=None,
                               model_type=config.text_model_type or config.model_type, image_token_id=None)


def build_twin(loaded: LoadedModel) -> nn.Module:
    """The twin with random weights, its linear layers in the real model's format."""
    config = twin_config(loaded.config)
    twin = build_model(config, max_positions=loaded.max_model_len).eval()
    packed_type = _packed_type(loaded.model)
    if packed_type is not None:   # routers stay fp32, as loaded
        targets = [(n, m) for n, m in twin.named_modules() if isinstance(m, nn.Linear)
                   and not n.endswith((".mlp.gate", ".mlp.shared_expert_gate"))]
        for name, linear in targets:
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, _random_packed(linear, packed_type))
        _pack_experts(twin, loaded.model, packed_type)
    packed_apart = getattr(loaded.model, "packed_apart", False)   # as the real model's layers
    for layer in twin.model.layers:
        layer.self_attn.fuse(packed_apart)
        layer.mlp.fuse(packed_apart)
    return twin


def _pack_experts(twin: nn.Module, model: nn.Module, packed_type: int) -> None:
    """The twin's experts packed where the real model's are (random blocks): the step it
    times runs as the real one does (the planned step takes packed experts)."""
    real = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    ours = [layer.mlp for layer in twin.model.layers if isinstance(layer.mlp, SparseMoE)]
    for block, twin_block in zip(real, ours):
        if block.experts.packed is None:
            continue
        experts = twin_block.experts
        shapes = ((experts.hidden, experts.inner), (experts.hidden, experts.inner), (experts.inner, experts.hidden))
        parts = [[_random_packed(nn.Linear(k, n, bias=False), packed_type).weight for _ in range(experts.num_experts)]
                 for k, n in shapes]
        experts.use_packed(*parts)


def _packed_type(model: nn.Module) -> int | None:
    types = [m.ggml_type for m in model.modules() if isinstance(m, PackedLinear)]
    return max(set(types), key=types.count) if types else None


def _random_packed(linear: nn.Linear, ggml_type: int) -> PackedLinear:
    shape = (linear.out_features, linear.in_features)
    values = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    try:
        blocks = gguf.quants.quantize(values, QType(ggml_type))
    except (NotImplementedError, gguf.quants.QuantError):
        if ggml_type == QType.Q8_0:
            return linear   # time the fp32 path instead
        # K-quants (gguf cannot encode them; the twin's rows are shorter than 256): a natively
        # read type of 32-element blocks costs the same fixed work per step
        return _random_packed(linear, QType.Q8_0)
    return PackedLinear(PackedWeight(torch.from_numpy(blocks.reshape(shape[0], -1).copy()), ggml_type, shape),
                        linear.bias)


def dispatch_seconds(loaded: LoadedModel, context: int, kv_cache_dtype: str = "auto", steps: int = 24) -> float:
    """Median time of one decode step of the twin, at `context` cached tokens, over a KV
    cache of the real engine's kv_cache_dtype."""
    from hayate.engine.engine import Engine

    twin = dataclasses.replace(loaded, model=build_twin(loaded), config=twin_config(loaded.config))
    engine = Engine(twin, EngineConfig(kv_cache_tokens=max(loaded.max_model_len, 16), kv_cache_dtype=kv_cache_dtype))
    prompt = [i % TWIN_VOCAB for i in range(max(1, min(context, loaded.max_model_len - steps - 2)))]
    engine.add_request("twin", prompt, SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True))
    engine.step()   # the prompt
    engine.step()   # one warm-up decode
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
