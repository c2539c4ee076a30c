"""ModelConfig: the architecture settings of a model's text part, read from a Hugging Face
config (a vision-language model's text_config, with its top level's architecture name)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None   # attention window; contexts are capped to it
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    text_model_type: str = ""           # the text part's own model_type ("llama" in a VLM; "": model_type)
    image_token_id: int | None = None   # the placeholder a VLM's image embeddings replace
    # Gemma 3: per-layer attention windows (None: global; () all global), its local RoPE base,
    # the query scale (None: head_dim ** -0.5), and 1.0 where norms compute x̂ * (1 + w).
    layer_windows: tuple[int | None, ...] = ()
    local_rope_theta: float | None = None
    query_scale: float | None = None
    norm_weight_offset: float = 0.0
    # Mixture of experts: experts per layer (0: a dense MLP), experts each token uses, an
    # expert's inner size (0: intermediate_size), the shared expert's (0: none; Qwen2-MoE),
    # whether the chosen experts' weights are renormalised to sum to 1 (Mixtral: yes), and the
    # layers that keep a dense MLP of intermediate_size (Qwen-MoE's mlp_only_layers, sparse step).
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()
    # Normalised queries and keys: "head" (Qwen3: RMSNorm over each head), "full" (OLMoE: over
    # the whole projection), "" none; OLMoE's clip_qkv clamps q, k and v to +-it.
    qk_norm: str = ""
    clip_qkv: float | None = None
    # Granite: the embeddings scaled by embedding_multiplier, each layer's two outputs by
    # residual_multiplier before they join the residual, the logits divided by logits_scaling
    # (and the query scale is its attention_multiplier)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # The whole config.json, for settings only one architecture reads (a VLM's vision_config).
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict; raises ValueError naming what is missing."""
        original, hf = hf, _text_settings(hf)
        missing = [k for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}")
        sizes = {key: _positive(hf, key) for key in _SIZE_KEYS}
        heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        model_type = str(hf["model_type"])
        text_model_type = str(hf.get("text_model_type", model_type))
        config = cls(
            model_type=model_type,
            vocab_size=sizes["vocab_size"],
            hidden_size=hidden,
            intermediate_size=sizes["intermediate_size"],
            num_hidden_layers=sizes["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=_positive(hf, "num_key_value_heads", heads),
            head_dim=_positive(hf, "head_dim", hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_parameters(hf).get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=_positive(hf, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(hf, text_model_type),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            text_model_type=text_model_type,
            image_token_id=_image_token_id(original),
            hf_config=dict(original),
            qk_norm=_QK_NORM.get(text_model_type, ""),
            clip_qkv=_positive_number(hf, "clip_qkv"),
            **_expert_settings(hf),
        )
        if text_model_type in _GRANITE:
            return replace(config, **_granite_settings(hf))
        return replace(config, **_gemma3_settings(hf, config)) if text_model_type in _GEMMA3 else config


_GRANITE = ("granite", "granitemoe")


def _granite_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """Granite's four multipliers (transformers' GraniteConfig defaults, 1, where absent)."""
    return dict(embedding_multiplier=_positive_number(hf, "embedding_multiplier") or 1.0,
                residual_multiplier=_positive_number(hf, "residual_multiplier") or 1.0,
                logits_scaling=_positive_number(hf, "logits_scaling") or 1.0,
                query_scale=_positive_number(hf, "attention_multiplier") or 1.0)


_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# Families whose attention normalises queries and keys, and over what.
_QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}
# Families whose q/k/v carry a bias by default (transformers' Qwen2 and Qwen2-MoE: qkv_bias).
QKV_BIAS_FAMILIES = ("qwen2", "qwen2_moe")


def _attention_bias(hf: dict[str, Any], model_type: str) -> bool:
    if hf.get("attention_bias") is not None:
        return bool(hf["attention_bias"])
    return bool(hf.get("qkv_bias", model_type in QKV_BIAS_FAMILIES))


def _expert_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts settings (Mixtral's num_local_experts, or the Qwen-MoE / OLMoE
    num_experts and their extras), or nothing for a dense model."""
    key = "num_local_experts" if hf.get("num_local_experts") else "num_experts"
    if not hf.get(key):
        return {}
    experts, used = _positive(hf, key), _positive(hf, "num_experts_per_tok")
    if used > experts:
        raise ValueError(f"model config: num_experts_per_tok ({used}) exceeds {key} ({experts})")
    step = _positive(hf, "decoder_sparse_step", 1)
    dense_only = set(hf.get("mlp_only_layers") or ())
    layers = _positive(hf, "num_hidden_layers")
    return dict(
        num_local_experts=experts, num_experts_per_tok=used,
        moe_intermediate_size=_positive(hf, "moe_intermediate_size", _positive(hf, "intermediate_size")),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        # (transformers 5 names every family's count num_local_experts; Mixtral always renormalises)
        # (Granite-MoE takes a softmax over the chosen experts' logits: the renormalised weights)
        norm_topk_prob=bool(hf.get("norm_topk_prob", hf.get("text_model_type", hf["model_type"])
                                   in ("mixtral", "granitemoe"))),
        dense_layers=tuple(i for i in range(layers) if i in dense_only or (i + 1) % step != 0))


def _positive(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    """A size setting as a positive int (null, 0 or absent: the default, if any); ValueError naming it if not."""
    value = hf.get(key)
    value = default if default is not None and not value else value
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value <= 0:
        raise ValueError(f"model config: {key} must be a positive integer, got {value!r}")
    return int(value)


def _positive_number(hf: dict[str, Any], key: str) -> float | None:
    """An optional setting that must be a positive finite number (None where absent)."""
    value = hf.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"model config: {key} must be a positive number, got {value!r}")
    return float(value)


# transformers' LlamaConfig defaults, for keys a VLM's (partial) text_config leaves out.
_TEXT_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048)


def _text_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """A flat dict of text-model settings. A VLM's come from its text_config (gaps filled from
    the top level, then from Llama's defaults); the top level names the architecture."""
    if "text_config" not in hf or "hidden_size" in hf:
        return hf
    top = {key: value for key, value in hf.items() if key not in ("model_type", "text_config", "vision_config")}
    text = {**_TEXT_DEFAULTS, **top, **(hf["text_config"] or {})}
    # transformers ties the head when either level asks for it (LLaVA saved it in text_config).
    tied = bool(top.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    return dict(text, model_type=hf.get("model_type"), text_model_type=text["model_type"],
                tie_word_embeddings=tied)


def _image_token_id(hf: dict[str, Any]) -> int | None:
    token = hf.get("image_token_id", hf.get("image_token_index"))
    return None if token is None else int(token)


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes "rope_parameters"; older configs write "rope_scaling".
    return dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    params = _rope_parameters(hf)
    kind = params.get("rope_type") or params.get("type")
    if kind in (None, "default"):
        return None
    return dict(params, rope_type=kind)


_GEMMA3 = ("gemma3", "gemma3_text")


def _gemma3_settings(hf: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Gemma 3's local/global layers, RoPE bases and query scale, from a config.json (either
    transformers 5's rope_parameters per layer type, or the older flat keys)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise ValueError(f"model config sets {key}, which hayate does not implement for Gemma 3")
    params = dict(hf.get("rope_parameters") or {})
    full = dict(params.get("full_attention") or hf.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {})
    scaling = dict(full, rope_type=full.get("rope_type") or full.get("type"))
    window = _positive(hf, "sliding_window", 4096)
    kinds = hf.get("layer_types") or [
        "full_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)]
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(f"model config: layer_types has {len(kinds)} entries for {config.num_hidden_layers} layers")
    return dict(
        rope_theta=float(full.get("rope_theta", hf.get("rope_theta", 1e6))),
        rope_scaling=None if scaling["rope_type"] in (None, "default") else scaling,
        local_rope_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4))),
        layer_windows=tuple(None if kind == "full_attention" else window for kind in kinds),
        query_scale=float(hf.get("query_pre_attn_scalar", config.head_dim)) ** -0.5,
        norm_weight_offset=float(hf.get("norm_weight_offset", 1.0)),
        sliding_window=None,   # global layers see the whole context: no cap
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
