"""The Llama family: Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (queries and keys normalised
per head), SmolLM2 (tied embeddings), and with a sparse mixture of experts as each layer's MLP
(layers/moe.py), Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (mixtral.py).

Module names follow Hugging Face's, so checkpoint names map onto parameters directly."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hayate.layers.attention import Attention, AttentionMetadata
from hayate.layers.quant import PackedWeight
from hayate.layers.norm import RMSNorm
from hayate.layers.fuse import fuse_linears
from hayate.layers.linear import share_workspace
from hayate.layers.moe import SparseMoE
from hayate.layers.rotary import RotaryEmbedding, apply_rotary
from hayate.models.config import QKV_BIAS_FAMILIES, ModelConfig
from hayate.models.weights import WeightValue, embedding, load_named_weights


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        # Qwen2 puts a bias on q/k/v only; Llama's attention_bias covers o_proj too.
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size,
                                bias=bias and (config.text_model_type or config.model_type) not in QKV_BIAS_FAMILIES)
        self.attn = Attention(heads, kv_heads, head_dim, scale=config.query_scale)   # None: head_dim ** -0.5
        self.shape = (heads, kv_heads, head_dim)
        # Qwen3 normalises each head of q and k, OLMoE the whole projections (before RoPE).
        self.qk_norm, self.clip = config.qk_norm, config.clip_qkv
        if config.qk_norm:
            whole = config.qk_norm == "full"
            self.q_norm = RMSNorm(heads * head_dim if whole else head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_heads * head_dim if whole else head_dim, config.rms_norm_eps)

        self.qkv_proj: nn.Module | None = None   # q, k, v stacked, made by fuse()

    def fuse(self, packed_apart: bool = False) -> None:
        """Stack q/k/v into one projection when their formats allow (after loading)."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj], packed_apart)
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        heads, kv_heads, head_dim = self.shape
        tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(rope, q, k)
        return self.o_proj(self.attn(q, k, v.view(tokens, kv_heads, head_dim), meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, inner: int | None = None):
        super().__init__()
        hidden, inner, bias = config.hidden_size, inner or config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.gate_up_proj: nn.Module | None = None   # gate and up stacked, made by fuse()

    def fuse(self, packed_apart: bool = False) -> None:
        fused = fuse_linears([self.gate_proj, self.up_proj], packed_apart)
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = _mlp(config) if config.num_local_experts and index not in config.dense_layers else LlamaMLP(config)
        self.residual_multiplier = config.residual_multiplier   # Granite's; 1 elsewhere

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        scale = self.residual_multiplier
        attended = self.self_attn(self.input_layernorm(x), rope, meta)
        x = x + (attended if scale == 1.0 else attended * scale)
        out = self.mlp(self.post_attention_layernorm(x))
        return x + (out if scale == 1.0 else out * scale)


def _mlp(config: ModelConfig) -> SparseMoE:
    """A mixture-of-experts layer's MLP, with its shared expert where the config has one."""
    shared = config.shared_expert_intermediate_size
    return SparseMoE(config.hidden_size, config.moe_intermediate_size or config.intermediate_size,
                     config.num_local_experts, config.num_experts_per_tok, config.norm_topk_prob,
                     LlamaMLP(config, shared) if shared else None)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = config.embedding_multiplier   # Granite's; 1 elsewhere (the planned step reads it)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # A VLM passes the embeddings itself, image rows already in place.
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if inputs_embeds is None and self.embed_scale != 1.0:
            x = x * self.embed_scale
        rope = self.rotary.tables(positions)
        for layer in self.layers:
            x = layer(x, rope, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [tokens] (or inputs_embeds [tokens, hidden] in place of the
        ids' embeddings) -> hidden states [tokens, hidden]."""
        return self.model(input_ids, positions, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [sequences, hidden] (last positions only) -> logits [sequences, vocab] fp32."""
        logits = self.lm_head(hidden).float()
        return logits if self.config.logits_scaling == 1.0 else logits / self.config.logits_scaling

    def load_weights(self, weights: Iterable[tuple[str, WeightValue]]) -> None:
        load_named_weights(self, without_tied_head(self.config, weights), skip=("rotary_emb.inv_freq",))
        finish_loading(self, self.model)


def without_tied_head(config: ModelConfig, weights: Iterable[tuple[str, WeightValue]],
                      head: str = "lm_head.weight") -> Iterable[tuple[str, WeightValue]]:
    """The weights less a tied head: it shares the embedding, and only a packed copy of it
    (faster to read) replaces it."""
    for name, value in weights:
        if not (config.tie_word_embeddings and name == head and not isinstance(value, PackedWeight)):
            yield name, value


def finish_loading(model: nn.Module, text_model: LlamaModel) -> None:
    """After the weights are in: fuse each layer's q/k/v and gate/up (natively read packed ones
    stay apart where the loader set model.packed_apart: the VNNI kernel takes them side by
    side), and give the model's packed layers one shared dequantization workspace."""
    packed_apart = getattr(model, "packed_apart", False)
    for layer in text_model.layers:
        layer.self_attn.fuse(packed_apart)
        layer.mlp.fuse(packed_apart)
    share_workspace(model)
