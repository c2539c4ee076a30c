"""The records that carry one image from the request edge to the vision encoder."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """One image, processed for one model's encoder, and how it appears in the prompt."""
    pixel_values: torch.Tensor                 # [tiles, 3, height, width] fp32 (LLaVA: one tile)
    pixel_attention_mask: torch.Tensor | None  # [tiles, height, width] bool, True on real pixels (Idefics3), else None
    placeholder: str                           # text that replaces this image's marker in the prompt
    num_image_tokens: int                      # image-token ids in `placeholder` = rows the encoder yields
    content_hash: str                          # sha256 hex of the image's bytes: the encoder-cache key


@dataclass
class PromptImages:
    """A prompt's images, in the order their markers appear, as the engine receives them."""
    features: list[ImageFeatures]
    preprocess_s: float = 0.0    # the processor's time (resize, tiles, normalisation)
    load_s: float = 0.0          # reading or fetching, and decoding, the images
    def __len__(self) -> int:
        return len(self.features)
