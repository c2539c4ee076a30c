"""Gemma 3 (text): scaled embeddings, four norms per layer, QK-norm, GeGLU, and sliding-window
attention on most layers, each kind of layer with its own RoPE base.

Module names follow Hugging Face's Gemma3ForCausalLM, so checkpoint names map directly. Hugging
Face stores norm weights w for x̂ * (1 + w); GGUF files store w + 1 already. Loading adds the
config's norm_weight_offset, so every norm here is a plain x̂ * w."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hayate.layers.attention import Attention, AttentionMetadata
from hayate.layers.norm import RMSNorm
from hayate.layers.rotary import RotaryEmbedding, apply_rotary
from hayate.models.config import ModelConfig
from hayate.models.llama import LlamaAttention, LlamaMLP, finish_loading, without_tied_head
from hayate.models.weights import WeightValue, embedding, load_named_weights

Rope = tuple[torch.Tensor, torch.Tensor]


class Gemma3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__(config)
        heads, kv_heads, head_dim = self.shape
        self.attn = Attention(heads, kv_heads, head_dim, scale=config.query_scale, window=window)
        self.qk_norm = "head"   # each head of q and k normalised (as Qwen3's; the planned step reads this)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata) -> torch.Tensor:
        heads, kv_heads, head_dim = self.shape
        tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # QK-norm over each head's values, before the rotation.
        q = self.q_norm(q.reshape(tokens, heads, head_dim))
        k = self.k_norm(k.reshape(tokens, kv_heads, head_dim))
        q, k = apply_rotary(rope, q, k)
        return self.o_proj(self.attn(q, k, v.reshape(tokens, kv_heads, head_dim), meta))


class Gemma3MLP(LlamaMLP):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.is_local = window is not None
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Gemma3Attention(config, window)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        windows = config.layer_windows or (None,) * config.num_hidden_layers
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        # Hugging Face multiplies by sqrt(hidden) held as an fp32 tensor, cast to the weights' dtype.
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32, device="cpu").item()
        # Global layers: rope_theta (and any scaling); local layers: their own base, unscaled.
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.local_rotary = RotaryEmbedding(config.head_dim, max_positions,
                                            config.local_rope_theta or config.rope_theta)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, window) for window in windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:   # the scale rounded to the weights' dtype, as Hugging Face's is
            inputs_embeds = self.embed_tokens(input_ids)
            inputs_embeds = inputs_embeds * torch.tensor(self.embed_scale, dtype=inputs_embeds.dtype).item()
        x = inputs_embeds
        rope, local_rope = self.rotary.tables(positions), self.local_rotary.tables(positions)
        for layer in self.layers:
            x = layer(x, local_rope if layer.is_local else rope, meta)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config, max_positions or config.max_position_embeddings)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [tokens] -> hidden states [tokens, hidden]."""
        return self.model(input_ids, positions, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [sequences, hidden] (last positions only) -> logits [sequences, vocab] fp32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, WeightValue]]) -> None:
        load_named_weights(self, without_tied_head(self.config, _text_names(weights)))
        if self.config.norm_weight_offset:
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, RMSNorm):
                        module.weight += self.config.norm_weight_offset
        finish_loading(self, self.model)


# A multimodal Gemma 3 checkpoint's text weights, under transformers 5's and 4's prefixes.
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def _text_names(weights: Iterable[tuple[str, WeightValue]]) -> Iterable[tuple[str, WeightValue]]:
    """The text model's weights under Gemma3ForCausalLM's names (a multimodal folder's
    vision tower is left out: hayate runs its text part only)."""
    for name, value in weights:
        if name.startswith(_VISION_PREFIXES):
            continue
        prefix = next((p for p in _TEXT_PREFIXES if name.startswith(p)), None)
        yield (name if prefix is None else _TEXT_PREFIXES[prefix] + name[len(prefix):]), value
