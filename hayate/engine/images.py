"""Images inside the engine: where a request's image tokens sit in its prompt, their
embeddings (encoded once, through the encoder cache), and the step's input embeddings with
those rows in place of the image tokens' own."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import torch
from torch import nn

from hayate.engine.request import ImageTimings
from hayate.engine.scheduler import ScheduledSequence
from hayate.multimodal.encoder_cache import EncoderCache
from hayate.multimodal.features import ImageFeatures, PromptImages


# Pixels one vision-encoder call takes at most: two 512-pixel tiles (2048 SigLIP patches, some
# 20 MB of activations in bf16 and fp32), four 336-pixel LLaVA views.
MAX_PIXELS_PER_CALL = 2 * 512 * 512


@dataclass(eq=False)
class RequestImages:
    """One request's images, in prompt order."""
    features: list[ImageFeatures]
    positions: list[int]                   # prompt indices of the image tokens, in order
    timings: ImageTimings
    embeddings: torch.Tensor | None = None   # [len(positions), hidden], once encoded

    @classmethod
    def create(cls, images: PromptImages, prompt_token_ids: list[int], image_token_id: int) -> "RequestImages":
        """Raises ValueError if the prompt's image tokens do not match the images."""
        positions = [i for i, token in enumerate(prompt_token_ids) if token == image_token_id]
        expected = images.num_image_tokens
        if len(positions) != expected:
            raise ValueError(f"the prompt holds {len(positions)} image tokens but its {len(images)} "
                             f"image(s) need {expected}")
        return cls(list(images.features), positions,
                   ImageTimings(num_images=len(images), preprocess=images.preprocess_s, load=images.load_s,
                                num_image_tokens=expected))

    def rows_in(self, start: int, count: int) -> tuple[int, int]:
        """The embedding rows [first, last) whose tokens fall in prompt[start:start + count]."""
        return (bisect.bisect_left(self.positions, start),
                bisect.bisect_left(self.positions, start + count))


class ImageEmbedder:
    """Runs the model's vision encoder for requests' images and splices the results in."""

    def __init__(self, model: nn.Module, cache: EncoderCache):
        self.model, self.cache = model, cache

    @staticmethod
    def touches(sequences: list[ScheduledSequence]) -> bool:
        """Whether any scheduled token is an image token."""
        return any(map(_has_image_tokens, sequences))

    def inputs_embeds(self, sequences: list[ScheduledSequence], input_ids: torch.Tensor) -> torch.Tensor | None:
        """Input embeddings for the step, or None when no scheduled token is an image token."""
        spans = [(offset, s) for offset, s in _offsets(sequences) if _has_image_tokens(s)]
        if not spans:
            return None
        self.encode([_images(scheduled) for _, scheduled in spans])
        embeds = self.model.embed_input_ids(input_ids)
        for offset, scheduled in spans:
            images = _images(scheduled)
            first, last = images.rows_in(scheduled.start, scheduled.num_tokens)
            rows = torch.tensor(images.positions[first:last], device=embeds.device) - scheduled.start + offset
            embeds[rows] = images.embeddings[first:last].to(embeds.dtype)
        return embeds

    def encode(self, requests: list[RequestImages]) -> None:
        """Fill each request's embeddings (once per request). The images the cache lacks, of
        every request in the step, go through the encoder together: one batch of tiles per
        tile shape, so a photo's tiles and other users' images share the matrix products."""
        pending = [images for images in requests if images.embeddings is None]
        if not pending:
            return
        begin = time.perf_counter()
        found: dict[str, torch.Tensor] = {}      # held here: a put below may evict from the cache
        missing: dict[str, ImageFeatures] = {}
        for features in (f for images in pending for f in images.features):
            key = features.cache_key
            if key not in found and key not in missing:
                cached = self.cache.get(key)
                if cached is None:
                    missing[key] = features
                else:
                    found[key] = cached
        encoded = self._encode_batches(list(missing.values()))
        for key, embeddings in encoded.items():
            self.cache.put(key, embeddings)
        elapsed = time.perf_counter() - begin
        for images in pending:
            images.embeddings = torch.cat([encoded.get(f.cache_key, found.get(f.cache_key)) for f in images.features])
            images.timings.encoder_cache_hits += sum(f.cache_key in found for f in images.features)
            images.timings.encode = elapsed

    def _encode_batches(self, images: list[ImageFeatures]) -> dict[str, torch.Tensor]:
        """Each image's embeddings by cache key; images whose tiles share a shape (and whose
        masks are alike: all present or all absent) run as one batch of tiles."""
        groups: dict[tuple, list[ImageFeatures]] = {}
        for features in images:
            shape = (tuple(features.pixel_values.shape[1:]), features.pixel_attention_mask is None)
            groups.setdefault(shape, []).append(features)
        encoded = {}
        for group in groups.values():
            pixels = torch.cat([f.pixel_values for f in group])
            masks = [f.pixel_attention_mask for f in group]
            masks = None if masks[0] is None else torch.cat(masks)
            rows = self._encode_tiles(pixels, masks)
            for features, embeddings in zip(group, rows.split([f.num_image_tokens for f in group])):
                # a batch's slices are copied out: a cached view would keep the whole batch alive
                encoded[features.cache_key] = embeddings.clone() if len(group) > 1 else embeddings
        return encoded

    def _encode_tiles(self, pixels: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """[tiles, 3, H, W] -> each tile's rows, in order: a few tiles per encoder call, so a
        layer's activations stay in the CPU's last-level cache (13 SigLIP-512 tiles of a photo
        ran 10-15% faster one or two at a time than all at once: docs/PERFORMANCE.md)."""
        step = max(1, MAX_PIXELS_PER_CALL // (pixels.shape[-2] * pixels.shape[-1]))
        if step >= len(pixels):
            return self.model.encode_image(pixels, masks)
        return torch.cat([self.model.encode_image(pixels[i:i + step], None if masks is None else masks[i:i + step])
                          for i in range(0, len(pixels), step)])


def _images(scheduled: ScheduledSequence) -> RequestImages | None:
    return getattr(scheduled.request, "images", None)


def _has_image_tokens(scheduled: ScheduledSequence) -> bool:
    images = _images(scheduled)
    if images is None:
        return False
    first, last = images.rows_in(scheduled.start, scheduled.num_tokens)
    return last > first


def _offsets(sequences: list[ScheduledSequence]):
    offset = 0
    for scheduled in sequences:
        yield offset, scheduled
        offset += scheduled.num_tokens
