"""The decode step planned once at start-up: a Llama-family model (Qwen3's QK-norm included,
Gemma 3, and mixtures of experts whose experts are packed: Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE with its whole-projection QK-norm and clip) whose
projections are all natively readable GGUF blocks (NATIVE_TYPES, mixed as a file mixes them;
q, k and v of different types, which do not fuse, run side by side in one call) runs a whole step
(embedding to logits) as one native call over weights, KV cache and buffers fixed at
construction (hayate/kernels/decode.cpp).

A step is up to MAX_NATIVE_ROWS rows, each a token at its position: decodes, and short
prompt chunks (a chunk's rows are consecutive positions of one sequence); a step of up to
24x that many tokens runs as consecutive planned steps. Other models, and
bigger steps or steps with image tokens, run the eager model: the plan's slow twin, which
the tests compare it with."""
from __future__ import annotations

import torch
from torch import nn

from hayate.engine.kv_cache import KVCache
from hayate.kernels import MAX_NATIVE_ROWS, native_kernels
from hayate.layers.embedding import PackedEmbedding
from hayate.layers.linear import NATIVE_TYPES, PackedLinear, rearrange_for_vnni
from hayate.layers.moe import SparseMoE
from hayate.layers.norm import RMSNorm
from hayate.models.gemma3 import Gemma3ForCausalLM, Gemma3MLP
from hayate.models.llama import LlamaForCausalLM
from hayate.models.mixtral import MixtralForCausalLM

PLANNABLE = (LlamaForCausalLM, MixtralForCausalLM, Gemma3ForCausalLM)


class PlannedDecode:
    """Runs steps of up to MAX_NATIVE_ROWS rows (a token each)."""

    def __init__(self, plan, block_size: int):
        self._plan, self.block_size = plan, block_size
        self.max_batch = MAX_NATIVE_ROWS
        # A step of up to this many tokens runs as consecutive planned steps of max_batch rows,
        # which on these CPUs beats the eager model's dequantize-then-matmul below ~500 tokens:
        # 0.33x its time at 17 tokens, 0.5x at 48-160, 0.87x at 384, even at 512
        # (docs/PERFORMANCE.md); past this, a step runs eagerly.
        self.max_tokens = 24 * MAX_NATIVE_ROWS
        # Each row of a planned prompt chunk reads all the keys before it (the flash attention
        # of the eager model reads each key once for the whole chunk), so a prompt chunk runs
        # planned only while it ends by this position; a prompt's first max_tokens are a chunk
        # of their own (scheduler.py), so every prompt starts planned.
        self.max_prefill_end = 2 * self.max_tokens

    @classmethod
    def build(cls, model: nn.Module, kv_cache: KVCache) -> "PlannedDecode | None":
        """The plan for this model, or None where its layers are not all native-packed."""
        kernels = native_kernels()
        if kernels is None or not _plannable(model):
            return None
        config, text = model.config, model.model
        rearrange_for_vnni(_linears(model))
        plan = kernels.DecodePlan(
            heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            eps=text.norm.eps, embedding=_table(text.embed_tokens), cos=text.rotary.cos, sin=text.rotary.sin,
            final_norm=text.norm.weight, kv_cache=kv_cache.storage, block_size=kv_cache.block_size,
            threads=torch.get_num_threads(), embedding_type=getattr(text.embed_tokens, "ggml_type", 0),
            embedding_scale=getattr(text, "embed_scale", 1.0), gelu=isinstance(text.layers[0].mlp, Gemma3MLP))
        for layer in text.layers:
            qkv, o, *mlp = _projections(layer)
            attention = layer.self_attn   # QK-norm per head (Qwen3, Gemma 3) or whole (OLMoE), where it has one
            norms = (attention.q_norm.weight, attention.k_norm.weight) if attention.qk_norm else (None, None)
            dense = [*_matrix(mlp[0]), *_matrix(mlp[1])] if mlp else [None] * 6
            plan.add_layer(layer.input_layernorm.weight, _mlp_norm(layer).weight,
                           *_matrix(qkv), *_matrix(o), *dense, *norms, clip=config.clip_qkv or 0.0,
                           **_gemma_settings(layer, text, config.query_scale))
            if not mlp:   # the layer's experts, each expert's gate and up side by side
                block, experts = layer.mlp, layer.mlp.experts.packed
                gate_up, down = [_matrix([g, u]) for g, u, _ in experts], [_matrix([d]) for _, _, d in experts]
                shared = block.shared_expert   # Qwen2-MoE's, with its sigmoid gate
                shared_args = {}
                if shared is not None:
                    (shared_gate_up, shared_types, _), (shared_down, down_type, _) = (
                        _matrix([shared.gate_proj, shared.up_proj]), _matrix([shared.down_proj]))
                    shared_args = dict(shared_gate_up=shared_gate_up, shared_gate_up_types=shared_types,
                                       shared_down=shared_down, shared_down_type=down_type,
                                       shared_gate=block.shared_expert_gate.weight.detach().reshape(-1))
                plan.add_experts(block.gate.weight.detach(), block.top_k, block.normalize,
                                 [m[0] for m in gate_up], [m[1] for m in gate_up], [m[0] for m in down],
                                 [m[1] for m in down], **shared_args)
        plan.set_head(*_matrix([model.lm_head])[:2])
        if config.residual_multiplier != 1.0 or config.logits_scaling != 1.0:   # Granite's
            plan.set_output_scales(residual=config.residual_multiplier, logit_divisor=config.logits_scaling)
        planned = cls(plan, kv_cache.block_size)
        planned.warm_up()
        return planned

    def warm_up(self) -> None:
        """One step of every row at position 0 of block 0 (empty at start-up, and any
        sequence writes its own keys there before it reads them): buffers sized, threads
        started, pages touched, before the first request."""
        rows = self.max_batch
        self.run([0] * rows, [0] * rows, [[0]] * rows)

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
            logit_rows: list[int] | None = None) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] (default: every row) of rows' tokens (at `positions`),
        each of which writes its key and value into the cache blocks of its `block_tables`
        entry. Rows run in pieces of max_batch, in order; within a piece every row's key and
        value is written before any row attends: a prompt chunk's rows see each other causally."""
        rows = len(token_ids)
        if rows > self.max_tokens:
            raise ValueError(f"a planned step takes at most {self.max_tokens} tokens, got {rows}")
        wanted = list(range(rows)) if logit_rows is None else logit_rows
        if rows <= self.max_batch:   # a decode step: one piece, the lists as they are
            return self._plan.run(token_ids, positions, block_tables, wanted)
        pieces = []
        for first in range(0, rows, self.max_batch):
            last = min(rows, first + self.max_batch)
            here = [row - first for row in wanted if first <= row < last]
            pieces.append(self._plan.run(token_ids[first:last], positions[first:last], block_tables[first:last], here))
        return torch.cat(pieces)


def decode_path(model: nn.Module) -> str:
    """How this model's decode steps will run on this machine, in words (hayate plan)."""
    kernels = native_kernels()
    if kernels is None or not _plannable(model):
        return "eager PyTorch model (not all projections natively read GGUF blocks, or no C++ compiler)"
    if hasattr(kernels, "InterleavedWeight"):
        return ("planned native step; AVX-512 VNNI kernel over the weights rearranged in groups of 16 rows "
                "(Q4_0 holds its offsets too: 20 bytes a block; K-quants' 6-bit scales as bytes), activations exact to fp32")
    return "planned native step; GGUF blocks read in place with fp32 activations (no AVX-512 VNNI)"


def _mlp_norm(layer: nn.Module) -> RMSNorm:
    """The norm before a layer's MLP (Gemma's pre_feedforward_layernorm: its
    post_attention_layernorm normalises the attention's output)."""
    return getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)


def _gemma_settings(layer: nn.Module, text: nn.Module, query_scale: float | None = None) -> dict:
    """A Gemma 3 layer's norms on its attention's and MLP's outputs, query scale, window and
    (a sliding-window layer's) RoPE tables; for other layers the query scale where the config
    sets one (Granite's attention multiplier), else nothing."""
    if not hasattr(layer, "pre_feedforward_layernorm"):
        return {} if query_scale is None else dict(scale=layer.self_attn.attn.scale)
    attention = layer.self_attn.attn
    rotary = text.local_rotary if layer.is_local else text.rotary
    return dict(attention_out_norm=layer.post_attention_layernorm.weight, mlp_out_norm=layer.post_feedforward_layernorm.weight,
                scale=attention.scale, window=attention.window or 0, cos=rotary.cos, sin=rotary.sin)


def _matrix(linears: list[PackedLinear]) -> tuple:
    """A projection's weight for the plan: each layer's rearranged one (shared), else its GGUF
    blocks; several layers (unfused q, k, v) as lists, side by side, with one bias."""
    weights = [linear.packed if linear.interleaved is None else linear.interleaved for linear in linears]
    types = [linear.ggml_type for linear in linears]
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if len(linears) == 1:
        return weights[0], types[0], bias
    return weights, types, bias


def _table(embedding: nn.Module) -> torch.Tensor:
    """The embedding's rows as the plan reads them: GGUF blocks (uint8, decoded a row at a
    time, `ggml_type`) or fp32."""
    return embedding.packed if isinstance(embedding, PackedEmbedding) else embedding.weight


def _projections(layer: nn.Module) -> list[list]:
    """A layer's qkv, o, gate_up and down projections, each as its fused layer or its parts
    (a mixture of experts' layer: qkv and o only)."""
    attention, mlp = layer.self_attn, layer.mlp
    qkv = [attention.qkv_proj] if attention.qkv_proj is not None else [attention.q_proj, attention.k_proj, attention.v_proj]
    if isinstance(mlp, SparseMoE):
        return [qkv, [attention.o_proj]]
    gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
    return [qkv, [attention.o_proj], gate_up, [mlp.down_proj]]


def _linears(model: nn.Module) -> list:
    """Every projection the plan reads: the head, each layer's, and each expert's."""
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    experts = [m for block in blocks for parts in (block.experts.packed or ()) for m in parts]
    experts += [m for block in blocks if block.shared_expert is not None
                for m in (block.shared_expert.gate_proj, block.shared_expert.up_proj, block.shared_expert.down_proj)]
    return [model.lm_head] + [m for layer in model.model.layers for part in _projections(layer) for m in part] + experts


def _experts_plannable(model: nn.Module) -> bool:
    """A mixture of experts' layers, where it has them, each packed, its router (and a shared
    expert's gate) in fp32; a shared expert's projections are among _linears, checked there."""
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    routers = [block.gate for block in blocks] + [block.shared_expert_gate for block in blocks
                                                  if block.shared_expert is not None]
    return all(block.experts.packed is not None for block in blocks) and all(
        type(r) is nn.Linear and r.weight.dtype == torch.float32 and r.bias is None for r in routers)


def _plannable(model: nn.Module) -> bool:
    config = model.config if type(model) in PLANNABLE else None
    if config is None or not isinstance(model.lm_head, PackedLinear):
        return False
    text = model.model
    table = _table(text.embed_tokens)
    if table.device.type != "cpu" or not (table.dtype == torch.float32 or text.embed_tokens.ggml_type in NATIVE_TYPES):
        return False
    eps = {norm.eps for norm in model.modules() if isinstance(norm, RMSNorm)}
    linears = _linears(model)
    if any(not isinstance(m, PackedLinear) or m.ggml_type not in NATIVE_TYPES for m in linears):
        return False
    biases = [[m.bias is None for m in part] for layer in text.layers for part in _projections(layer)]
    return len(eps) == 1 and all(len(set(part)) == 1 for part in biases) and _experts_plannable(model)
