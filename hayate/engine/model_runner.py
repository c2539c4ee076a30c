"""Runs one forward pass over a scheduled batch and samples the next tokens."""
from __future__ import annotations

import torch
from torch import nn

from hayate.engine.images import ImageEmbedder
from hayate.engine.kv_cache import KVCache
from hayate.engine.scheduler import SchedulerOutput
from hayate.layers.attention import AttentionMetadata
from hayate.layers.sampler import SampleResult, Sampler
from hayate.models.config import ModelConfig
from hayate.multimodal.encoder_cache import EncoderCache


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 encoder_cache_bytes: int = 0):
        self.model = model
        self.kv_cache = KVCache(config, num_blocks, block_size)
        self.kv_cache.bind(model)
        self.sampler = Sampler()
        self.images = ImageEmbedder(model, EncoderCache(encoder_cache_bytes))

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> tuple[list[int], SampleResult | None]:
        """Run the batch; return the indices (into batch.sequences) that produced a token,
        and the sampled tokens for them, in that order."""
        sequences = batch.sequences
        meta = AttentionMetadata.build(
            [s.request.block_table for s in sequences], [s.start for s in sequences],
            [s.num_tokens for s in sequences], self.kv_cache.block_size)
        input_ids = torch.tensor([t for s in sequences for t in s.request.token_ids(s.start, s.num_tokens)])
        embeds = self.images.inputs_embeds(sequences, input_ids)
        if embeds is None:
            hidden = self.model(input_ids, meta.positions(), meta)
        else:
            hidden = self.model(input_ids, meta.positions(), meta, inputs_embeds=embeds)
        # Only sequences whose every token is now cached sample the next one.
        sampling = [i for i, s in enumerate(sequences) if s.start + s.num_tokens >= s.request.num_tokens]
        if not sampling:
            return [], None
        last = meta.last_token_indices()[sampling]
        logits = self.model.compute_logits(hidden[last])
        return sampling, self.sampler(logits, [sequences[i].request.sampling for i in sampling])
