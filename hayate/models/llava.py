"""LLaVA (1.5): a CLIP vision tower, a two-layer projector, and a Llama text model that reads
the projected patch features in place of the image tokens' own embeddings.

Module names follow the Hugging Face hub's LLaVA checkpoints (`language_model.model.*`,
`language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`);
checkpoints in other layouts are renamed by the table below."""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from hayate.layers.attention import AttentionMetadata
from hayate.models.config import ModelConfig
from hayate.models.llama import LlamaForCausalLM, finish_loading, without_tied_head
from hayate.models.vision.clip import CLIP_DEFAULTS, CLIPVisionModel
from hayate.models.vision.encoder import VisionConfig, activation
from hayate.models.weights import WeightValue, load_named_weights

# Other layouts' names -> this model's: transformers >= 5 nests everything under `model.`, and
# its save_pretrained drops the vision tower's `vision_model.` level.
CHECKPOINT_NAMES = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"), "vision_tower.vision_model."),
)

# LLaVA-1.5's CLIP ViT-L/14-336, which transformers assumes when a config has no vision_config.
LLAVA_VISION_DEFAULTS = dict(CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14)


def checkpoint_name(name: str) -> str:
    for pattern, replacement in CHECKPOINT_NAMES:
        name = pattern.sub(replacement, name, count=1)
    return name


def _vision_config(hf: dict[str, Any]) -> VisionConfig:
    vision = hf.get("vision_config")
    if vision is None:
        return VisionConfig.from_hf({}, LLAVA_VISION_DEFAULTS)
    kind = vision.get("model_type", "clip_vision_model")
    if kind != "clip_vision_model":
        raise ValueError(f"LLaVA with a {kind!r} vision tower is not supported (supported: clip_vision_model)")
    return VisionConfig.from_hf(vision, CLIP_DEFAULTS)


def _feature_layers(hf: dict[str, Any], num_layers: int) -> list[int]:
    """The vision layers whose hidden states feed the projector (concatenated when several)."""
    layer = hf.get("vision_feature_layer", -2)
    layers = [int(layer)] if isinstance(layer, int) else [int(index) for index in layer]
    for index in layers:
        if not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(f"vision_feature_layer {index} is outside the {num_layers}-layer vision tower")
    return layers


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, vision_features: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_features, text_hidden, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaForConditionalGeneration(nn.Module):
    VISION_MODULES = ("vision_tower", "multi_modal_projector")   # run per image, not per token

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        if config.image_token_id is None:
            raise ValueError("a llava config needs image_token_index")
        hf = config.hf_config
        self.config = config
        self.image_token_id = config.image_token_id
        vision = _vision_config(hf)
        self.feature_layers = _feature_layers(hf, vision.num_hidden_layers)
        self.select_strategy = hf.get("vision_feature_select_strategy", "default")
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.select_strategy!r} is not supported "
                             "(supported: default, full)")
        self.vision_tower = CLIPVisionModel(vision)
        self.multi_modal_projector = LlavaMultiModalProjector(
            vision.hidden_size * len(self.feature_layers), config.hidden_size,
            hf.get("projector_hidden_act", "gelu"), bool(hf.get("multimodal_projector_bias", True)))
        self.language_model = LlamaForCausalLM(config, max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [tokens] (or inputs_embeds [tokens, hidden], image rows in
        place) -> hidden states [tokens, hidden]."""
        return self.language_model(input_ids, positions, meta, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[tokens] -> [tokens, hidden]: the text embeddings, image tokens' rows still to replace."""
        return self.language_model.model.embed_tokens(input_ids)

    def encode_image(self, pixel_values: torch.Tensor,
                     pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One image [1, 3, size, size] -> [image tokens, hidden]: its patches' features (and the
        class token's, for the "full" strategy), projected, in prompt order. The mask is unused."""
        weight = self.vision_tower.vision_model.embeddings.patch_embedding.weight
        states = self.vision_tower(pixel_values.to(weight), self.feature_layers)
        if self.select_strategy == "default":
            states = [state[:, 1:] for state in states]   # drop the class token
        return self.multi_modal_projector(torch.cat(states, dim=-1)).flatten(0, 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [sequences, hidden] (last positions only) -> logits [sequences, vocab] fp32."""
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, WeightValue]]) -> None:
        renamed = ((checkpoint_name(name), value) for name, value in weights)
        load_named_weights(self, without_tied_head(self.config, renamed, head="language_model.lm_head.weight"),
                           skip=("rotary_emb.inv_freq",))
        finish_loading(self, self.language_model.model)
