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
        expected = sum(image.num_image_tokens for image in images.features)
        if len(positions) != expected:
            raise ValueError(f"the prompt holds {len(positions)} image tokens but its {len(images)} "
                             f"image(s) need {expected}")
        return cls(list(images.features), positions,
                   ImageTimings(num_images=len(images), preprocess=images.preprocess_s, load=images.load_s))

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
        embeds = self.model.embed_input_ids(input_ids)
        for offset, scheduled in spans:
            images = _images(scheduled)
            self.encode(images)
            first, last = images.rows_in(scheduled.start, scheduled.num_tokens)
            rows = torch.tensor(images.positions[first:last], device=embeds.device) - scheduled.start + offset
            embeds[rows] = images.embeddings[first:last].to(embeds.dtype)
        return embeds

    def encode(self, images: RequestImages) -> None:
        """Fill images.embeddings (once per request; the cache spares repeated images)."""
        if images.embeddings is not None:
            return
        begin = time.perf_counter()
        parts = []
        for features in images.features:
            cached = self.cache.get(features.content_hash)
            if cached is None:
                cached = self.model.encode_image(features.pixel_values, features.pixel_attention_mask)
                self.cache.put(features.content_hash, cached)
            else:
                images.timings.encoder_cache_hits += 1
            parts.append(cached)
        images.embeddings = torch.cat(parts)
        images.timings.encode = time.perf_counter() - begin


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
