"""CLIP's vision tower, as LLaVA uses it: the hidden states of chosen layers, not the pooled
output. Module names follow Hugging Face's (`vision_tower.vision_model.*` in a LLaVA checkpoint)."""
from __future__ import annotations

import torch
from torch import nn

from hayate.models.weights import embedding
from hayate.models.vision.encoder import VisionConfig, VisionEncoder

# transformers' CLIPVisionConfig defaults, for keys a vision_config leaves out.
CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = embedding(config.patches_per_side ** 2 + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [images, 3, size, size] -> [images, 1 + patches, hidden], the class token first."""
        images, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"CLIP expects {self.image_size}x{self.image_size} images, got {height}x{width}")
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        embeddings = torch.cat([self.class_embedding.expand(images, 1, -1), patches], dim=1)
        return embeddings + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)   # sic: HF's name
        self.encoder = VisionEncoder(config)
        # Only the pooled output reads it; kept so checkpoints load as they are.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """The hidden states [images, 1 + patches, hidden] transformers lists as hidden_states[i]
        for each i in `layers` (0: the embeddings, k: after k layers, negative: from the end).
        Layers past the deepest one asked for are not run."""
        count = len(self.encoder.layers)
        wanted = [index % (count + 1) for index in layers]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        kept = {0: x}   # only the states asked for are held
        for depth, layer in enumerate(self.encoder.layers[:max(wanted)], start=1):
            x = layer(x, None)
            if depth in wanted:
                kept[depth] = x
        return [kept[index] for index in wanted]


class CLIPVisionModel(nn.Module):
    """The wrapper that gives checkpoint names their `vision_model.` level."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        return self.vision_model(pixel_values, layers)
