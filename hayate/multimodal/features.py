"""The records that carry one image from the request edge to the vision encoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# OpenAI's `detail` of an image part: one view at the encoder's own size, the model's full
# tiling, or a choice between them by the image's size (each processor's `view`).
ImageDetail = Literal["low", "high", "auto"]
IMAGE_DETAILS: tuple[str, ...] = ("low", "high", "auto")


@dataclass
class ImageFeatures:
    """One image, processed for one model's encoder, and how it appears in the prompt."""
    pixel_values: torch.Tensor                 # [tiles, 3, height, width] fp32 (LLaVA: one tile)
    pixel_attention_mask: torch.Tensor | None  # [tiles, height, width] bool, True on real pixels (Idefics3), else None
    placeholder: str                           # text that replaces this image's marker in the prompt
    num_image_tokens: int                      # image-token ids in `placeholder` = rows the encoder yields
    content_hash: str                          # sha256 hex of the image's bytes
    detail: str = "high"                       # the view the pixels are: "low" or "high"

    @property
    def cache_key(self) -> str:
        """The encoder cache's key: the same bytes seen at another detail are other pixels."""
        return f"{self.content_hash}/{self.detail}"


@dataclass
class PromptImages:
    """A prompt's images, in the order their markers appear, as the engine receives them."""
    features: list[ImageFeatures]
    preprocess_s: float = 0.0    # the processor's time (resize, tiles, normalisation)
    load_s: float = 0.0          # reading or fetching, and decoding, the images

    def __len__(self) -> int:
        return len(self.features)

    @property
    def num_image_tokens(self) -> int:
        return sum(image.num_image_tokens for image in self.features)
