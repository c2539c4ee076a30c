"""Tiny random Hugging Face models, made in the test (no download), saved as folders that
hayate loads like any other: config.json + model.safetensors + tokenizer.json."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_VOCAB = 256
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 320  # byte tokens + specials + room, as real vocabularies have
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "rope_theta": 500000.0}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is a token, plus ChatML specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def make_tiny_model(kind: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    """Create, save and return a tiny random transformers model of the given kind."""
    config_class, model_class, extra = ARCHITECTURES[kind]
    config = config_class(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.1, bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB + 3, **extra)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    return save_tiny_folder(model, folder)


def save_family(families: dict, name: str, common: dict, folder: Path) -> torch.nn.Module:
    """families[name] = (transformers config class, model class, settings beyond `common`):
    that model with seed 0's random weights, saved as a tiny folder; the model."""
    config_class, model_class, extra = families[name]
    torch.manual_seed(0)
    return save_tiny_folder(model_class(config_class(**common, **extra)).eval(), folder)


def save_tiny_folder(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Save a transformers model with the byte tokenizer, as a folder hayate and transformers
    both load; return the model."""
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return model
