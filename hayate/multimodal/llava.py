"""LLaVA-1.5 image processing: CLIP's resize, center crop and normalize (optionally padding to a
square of the mean colour first, as LlavaImageProcessor's do_pad does), and a placeholder of one
image token per vision feature. Follows transformers' CLIPImageProcessorPil /
LlavaImageProcessorPil and LlavaProcessor step by step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from hayate.multimodal.features import ImageDetail, ImageFeatures
from hayate.multimodal.processor import IMAGE_MARKER, PixelSteps, expand_markers, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `shortest_edge`, the longer truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, 3] -> [height, width, 3] around the centre; a smaller image is first zero-padded
    around itself, with transformers' rounding of both offsets."""
    orig_height, orig_width = pixels.shape[:2]
    top, left = (orig_height - height) // 2, (orig_width - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + height, left:left + width]
    padded_height, padded_width = max(height, orig_height), max(width, orig_width)
    padded = np.zeros((padded_height, padded_width, pixels.shape[2]), dtype=pixels.dtype)
    top_pad = math.ceil((padded_height - orig_height) / 2)
    left_pad = math.ceil((padded_width - orig_width) / 2)
    padded[top_pad:top_pad + orig_height, left_pad:left_pad + orig_width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(padded_height, top + height), max(0, left):min(padded_width, left + width)]


def pad_to_square(image: PIL.Image.Image, color: tuple[int, int, int]) -> PIL.Image.Image:
    """The image centred on a square of `color` as wide as its longest side."""
    if image.width == image.height:
        return image
    side = max(image.width, image.height)
    square = PIL.Image.new("RGB", (side, side), color)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


@dataclass
class LlavaProcessor:
    """LLaVA-1.5's processor: one CLIP-sized tile per image."""
    image_token_id: int
    size: dict[str, int] | None        # {"shortest_edge": n} or {"height", "width"}; None: no resize
    crop_size: tuple[int, int] | None  # (height, width) of the center crop; None: no crop
    pad_color: tuple[int, int, int] | None  # pad to a square of this colour first; None: no pad
    patch_size: int
    num_additional_image_tokens: int   # tokens the tower adds besides patches (CLIP's CLS: 1)
    vision_feature_select_strategy: str  # "default" drops the CLS feature, "full" keeps it
    pixels: PixelSteps
    image_token: str = IMAGE_MARKER

    @classmethod
    def from_configs(cls, preprocessor: dict, processor: dict, hf_config: dict) -> "LlavaProcessor":
        """From preprocessor_config.json, processor_config.json and config.json (as dicts);
        values a folder lacks are derived from the vision config."""
        vision = hf_config.get("vision_config") or {}
        image_size = vision.get("image_size", 224)
        pixels = PixelSteps.from_config(preprocessor, PIL.Image.Resampling.BICUBIC, CLIP_MEAN, CLIP_STD)
        return cls(
            image_token_id=hf_config.get("image_token_index", hf_config.get("image_token_id", 32000)),
            size=_size(preprocessor.get("size", image_size)) if preprocessor.get("do_resize", True) else None,
            crop_size=(_crop(preprocessor.get("crop_size", image_size))
                       if preprocessor.get("do_center_crop", True) else None),
            pad_color=_pad_color(preprocessor),
            patch_size=int(processor.get("patch_size") or vision.get("patch_size", 32)),
            num_additional_image_tokens=int(processor.get("num_additional_image_tokens", 1)),
            vision_feature_select_strategy=(processor.get("vision_feature_select_strategy")
                                            or hf_config.get("vision_feature_select_strategy", "default")),
            pixels=pixels, image_token=processor.get("image_token", IMAGE_MARKER))

    def process(self, image: PIL.Image.Image, content_hash: str, detail: ImageDetail = "high") -> ImageFeatures:
        """LLaVA-1.5 sees one view at the encoder's size whatever the detail: low and high alike."""
        image = to_rgb(image)
        if self.pad_color is not None:
            image = pad_to_square(image, self.pad_color)
        if self.size is not None:
            image = self.pixels.resize(image, *self._resized_size(image.height, image.width))
        pixels = np.asarray(image)
        if self.crop_size is not None:
            pixels = center_crop(pixels, *self.crop_size)
        pixel_values = torch.from_numpy(self.pixels.to_array(pixels))[None]  # [1, 3, height, width]
        height, width = pixel_values.shape[2:]
        num_tokens = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            num_tokens -= 1  # the CLS feature is dropped
        return ImageFeatures(pixel_values=pixel_values, pixel_attention_mask=None,
                             placeholder=self.image_token * num_tokens, num_image_tokens=num_tokens,
                             content_hash=content_hash, detail="low")

    def expand_prompt(self, text: str, images: list[ImageFeatures]) -> str:
        return expand_markers(text, self.image_token, images)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            return shortest_edge_size(height, width, self.size["shortest_edge"])
        return self.size["height"], self.size["width"]


def _size(size) -> dict[str, int]:
    """A resize setting: an int (legacy: the shortest edge) or a dict transformers' CLIP reads."""
    if isinstance(size, int):
        return {"shortest_edge": size}
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return {"shortest_edge": int(size["shortest_edge"])}
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise ValueError(f"LLaVA preprocessor size must be {{'shortest_edge': N}} or {{'height', 'width'}}, "
                     f"got {size!r}")


def _crop(crop_size) -> tuple[int, int]:
    if isinstance(crop_size, int):
        return crop_size, crop_size
    if isinstance(crop_size, dict) and {"height", "width"} <= set(crop_size):
        return int(crop_size["height"]), int(crop_size["width"])
    raise ValueError(f"LLaVA preprocessor crop_size must be {{'height', 'width'}}, got {crop_size!r}")


def _pad_color(preprocessor: dict) -> tuple[int, int, int] | None:
    """LlavaImageProcessor's do_pad background: the mean colour, truncated to bytes.
    (CLIPImageProcessor has no square padding, whatever its config says.)"""
    kind = preprocessor.get("image_processor_type", "")
    if not (preprocessor.get("do_pad") and kind.startswith("LlavaImageProcessor")):
        return None
    mean = preprocessor.get("image_mean", CLIP_MEAN)
    mean = mean if isinstance(mean, (list, tuple)) else [mean] * 3
    return tuple(int(value * 255) for value in mean)
