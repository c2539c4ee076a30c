"""Idefics3 / SmolVLM image processing: resize, cut into square tiles plus a global view, and the
prompt text that frames each tile's image tokens. Follows transformers' Idefics3ImageProcessorPil
and Idefics3Processor step by step, so the pixels and token ids are the same."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from hayate.multimodal.features import ImageDetail, ImageFeatures
from hayate.multimodal.processor import IMAGE_MARKER, PixelSteps, expand_markers, to_rgb

MAX_IMAGE_SIZE = 4096  # transformers' cap on the longest edge after the first resize
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


def fit_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Size after the first resize: the longest edge becomes `longest_edge` (up or down),
    the other keeps the aspect ratio rounded up to even; then both are capped at 4096."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect_ratio)
    return max(height, 1), max(width, 1)


def fit_tile_multiple(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """Size for the vision encoder: both edges rounded up to whole tiles (transformers'
    resize_for_vision_encoder, including its int() of the aspect-ratio step)."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile_size) * tile_size
        height = math.ceil(int(width / aspect_ratio) / tile_size) * tile_size
    else:
        height = math.ceil(height / tile_size) * tile_size
        width = math.ceil(int(height * aspect_ratio) / tile_size) * tile_size
    return height, width


@dataclass
class Idefics3Processor:
    """SmolVLM's processor: every tile is `tile_size` square and yields `image_seq_len` tokens."""
    image_token_id: int
    image_seq_len: int           # image tokens per tile, after the connector's pixel shuffle
    tile_size: int               # max_image_size["longest_edge"]: the encoder's input side
    longest_edge: int | None     # size["longest_edge"] of the first resize; None: do_resize off
    do_image_splitting: bool
    pixels: PixelSteps
    image_token: str = IMAGE_MARKER

    @classmethod
    def from_configs(cls, preprocessor: dict, processor: dict, hf_config: dict) -> "Idefics3Processor":
        """From preprocessor_config.json, processor_config.json and config.json (as dicts);
        values a folder lacks are derived from the vision config."""
        vision = hf_config.get("vision_config") or {}
        image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 32)
        scale_factor = hf_config.get("scale_factor", 2)
        seq_len = int(((image_size // patch_size) ** 2) / (scale_factor ** 2))
        tile_size = _edge(preprocessor.get("max_image_size"), image_size, "max_image_size")
        longest = _edge(preprocessor.get("size"), 4 * tile_size, "size")
        return cls(image_token_id=hf_config.get("image_token_id", 128257),
                   image_seq_len=int(processor.get("image_seq_len", seq_len)),
                   tile_size=tile_size,
                   longest_edge=longest if preprocessor.get("do_resize", True) else None,
                   do_image_splitting=bool(preprocessor.get("do_image_splitting", True)),
                   pixels=PixelSteps.from_config(preprocessor, PIL.Image.Resampling.LANCZOS,
                                                 (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))

    def process(self, image: PIL.Image.Image, content_hash: str, detail: ImageDetail = "high") -> ImageFeatures:
        image = to_rgb(image)
        view = self.view(image.width, image.height, detail)
        if self.longest_edge is not None:   # at low too: transformers' path with splitting off
            image = self.pixels.resize(image, *fit_longest_edge(image.height, image.width, self.longest_edge))
        if self.do_image_splitting and view == "high":
            tiles, rows, cols = self._split(image)
        else:   # the processor's own path with splitting off: one view squeezed to a tile
            tiles, rows, cols = [self.pixels.resize(image, self.tile_size, self.tile_size)], 0, 0
        # [tiles, 3, tile_size, tile_size]; every tile is whole, so the mask is all True. Built
        # in numpy: a PyTorch operator big enough to go parallel here (a server's worker thread)
        # would start a second OpenMP team, and libgomp then slows the engine's (see
        # AsyncEngine.start_with).
        pixel_values = torch.from_numpy(np.stack([self.pixels.to_array(np.asarray(t)) for t in tiles]))
        mask = torch.from_numpy(np.ones((pixel_values.shape[0], *pixel_values.shape[2:]), dtype=bool))
        return ImageFeatures(pixel_values=pixel_values, pixel_attention_mask=mask,
                             placeholder=self._placeholder(rows, cols),
                             num_image_tokens=self.image_seq_len * len(tiles), content_hash=content_hash,
                             detail=view)

    def view(self, width: int, height: int, detail: ImageDetail) -> str:
        """"low" or "high" for an image of this size. "high" is the processor's own path (the
        longest edge resized to `longest_edge`, then tiles plus a global view: 13 tiles for a
        640x480 photo); "low" the same processor with splitting off, one tile (64 tokens for
        SmolVLM). "auto" takes "low" for a picture that fits in one tile, whose tiles at "high"
        would be upscaled pixels with nothing new in them."""
        if detail == "auto":
            return "low" if max(width, height) <= self.tile_size else "high"
        return detail

    def expand_prompt(self, text: str, images: list[ImageFeatures]) -> str:
        return expand_markers(text, self.image_token, images)

    def _split(self, image: PIL.Image.Image) -> tuple[list[PIL.Image.Image], int, int]:
        """Row-major tiles then a global view squeezed to one tile; a picture that fits in
        one tile is its own global view (rows = cols = 0)."""
        side = self.tile_size
        image = self.pixels.resize(image, *fit_tile_multiple(image.height, image.width, side))
        if image.height <= side and image.width <= side:
            return [image], 0, 0
        rows, cols = image.height // side, image.width // side
        tiles = [image.crop((col * side, row * side, (col + 1) * side, (row + 1) * side))
                 for row in range(rows) for col in range(cols)]
        return [*tiles, self.pixels.resize(image, side, side)], rows, cols

    def _placeholder(self, rows: int, cols: int) -> str:
        """Idefics3Processor's text: a line of tiles per row, a blank line, the global view."""
        image_run = self.image_token * self.image_seq_len
        global_view = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{image_run}{FAKE_TOKEN}"
        if rows == 0 and cols == 0:
            return global_view
        lines = ("".join(f"{FAKE_TOKEN}<row_{row + 1}_col_{col + 1}>{image_run}" for col in range(cols)) + "\n"
                 for row in range(rows))
        return "".join(lines) + "\n" + global_view


def _edge(size: dict | None, default: int, name: str) -> int:
    """The "longest_edge" of a size setting."""
    if size is None:
        return default
    if not isinstance(size, dict) or "longest_edge" not in size:
        raise ValueError(f"Idefics3 preprocessor {name} must be {{'longest_edge': N}}, got {size!r}")
    return int(size["longest_edge"])
