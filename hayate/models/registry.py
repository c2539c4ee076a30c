"""Architecture name (Hugging Face model_type or architectures entry) -> model class."""
from __future__ import annotations

from torch import nn

from hayate.models.config import ModelConfig
from hayate.models.gemma3 import Gemma3ForCausalLM
from hayate.models.idefics3 import Idefics3ForConditionalGeneration
from hayate.models.llama import LlamaForCausalLM
from hayate.models.llava import LlavaForConditionalGeneration
from hayate.models.mixtral import MixtralForCausalLM

_MODEL_TYPES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "mixtral": MixtralForCausalLM,   # also a GGUF "llama" file with experts (gguf_experts.py)
    "qwen2": LlamaForCausalLM,
    "qwen2_moe": MixtralForCausalLM,
    "qwen3": LlamaForCausalLM,
    "qwen3_moe": MixtralForCausalLM,
    "olmoe": MixtralForCausalLM,
    "granite": LlamaForCausalLM,   # Llama with four multipliers (ModelConfig)
    "granitemoe": MixtralForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,   # a GGUF file's architecture, or a multimodal folder's text part
    "idefics3": Idefics3ForConditionalGeneration,   # SmolVLM
    "llava": LlavaForConditionalGeneration,
}


def supported_model_types() -> list[str]:
    return sorted(_MODEL_TYPES)


def model_class(model_type: str) -> type[nn.Module]:
    try:
        return _MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"unsupported architecture {model_type!r}; hayate supports "
                         f"{', '.join(supported_model_types())}") from None


def build_model(config: ModelConfig, max_positions: int | None = None) -> nn.Module:
    return model_class(config.model_type)(config, max_positions)
