"""Idefics3's vision transformer: SigLIP whose position embeddings follow a patch mask, so a
tile padded at its right or bottom still spreads the full position grid over its real patches.

Module names follow Hugging Face's (`model.vision_model.*` in a SmolVLM checkpoint)."""
from __future__ import annotations

import torch
from torch import nn

from hayate.models.weights import embedding
from hayate.models.vision.encoder import VisionConfig, VisionEncoder

# transformers' Idefics3VisionConfig defaults, for keys a vision_config leaves out.
SIGLIP_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                       image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-6,
                       hidden_act="gelu_pytorch_tanh")


def patch_mask(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[tiles, H, W] pixel mask (True: real pixel) -> [tiles, H / patch, W / patch]: a patch is
    real when any of its pixels is."""
    tiles, height, width = pixel_mask.shape
    grid = pixel_mask.bool().view(tiles, height // patch_size, patch_size, width // patch_size, patch_size)
    return grid.any(dim=4).any(dim=2)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size, self.patches_per_side = config.patch_size, config.patches_per_side
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = embedding(self.patches_per_side ** 2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, H, W], mask [tiles, H / patch, W / patch] -> [tiles, patches, hidden]."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return patches + self.position_embedding(self.position_ids(mask))

    def position_ids(self, mask: torch.Tensor) -> torch.Tensor:
        """[tiles, patches]: each real patch's fractional (row, column) within its tile's real
        patches, bucketed onto the trained grid; padded patches get 0. The arithmetic is
        transformers' own, so the buckets fall exactly where its do."""
        side = self.patches_per_side
        boundaries = torch.arange(1 / side, 1.0, 1 / side, device=mask.device)
        rows, cols = (self._buckets(mask.shape[axis], mask.sum(dim=axis)[:, 0], boundaries) for axis in (1, 2))
        ids = (rows[:, :, None] * side + cols[:, None, :]).flatten(1)
        return torch.where(mask.flatten(1), ids, 0)

    @staticmethod
    def _buckets(length: int, num_real: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
        """[tiles, length] bucket of each index along one side, with num_real [tiles] real ones."""
        step = 1.0 / num_real
        fractions = torch.arange(length, device=boundaries.device, dtype=torch.float32)[None, :] * step[:, None]
        return torch.bucketize(fractions.clamp(max=1.0 - 1e-6), boundaries, right=True)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [tiles, 3, H, W], patch mask [tiles, H / patch, W / patch] (None: no
        padding) -> [tiles, patches, hidden]; padded patches are computed but never attended to."""
        tiles, _, height, width = pixel_values.shape
        if mask is None:
            mask = torch.ones(tiles, height // self.config.patch_size, width // self.config.patch_size,
                              dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, mask)
        attention_mask = None if bool(mask.all()) else mask.view(tiles, 1, 1, -1)
        return self.post_layernorm(self.encoder(x, attention_mask))
