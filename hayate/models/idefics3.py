"""Idefics3 (SmolVLM): a SigLIP vision transformer, a pixel-shuffle connector, and a Llama
text model that reads the image embeddings in place of the image tokens' own.

Module names follow Hugging Face's (`model.vision_model.*`, `model.connector.*`,
`model.text_model.*`, `lm_head.weight`), so checkpoint names map onto parameters directly."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from hayate.layers.attention import AttentionMetadata
from hayate.models.config import ModelConfig
from hayate.models.llama import LlamaModel, finish_loading, without_tied_head
from hayate.models.vision.encoder import VisionConfig
from hayate.models.vision.siglip import SIGLIP_DEFAULTS, SiglipVisionTransformer, patch_mask
from hayate.models.weights import WeightValue, load_named_weights


class Idefics3SimpleMLP(nn.Module):
    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.proj = nn.Linear(input_size, output_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Idefics3Connector(nn.Module):
    """Folds each scale x scale square of patches into one token, then projects it into the
    text model's embedding space: scale² times fewer image tokens."""

    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = Idefics3SimpleMLP(vision_hidden * scale_factor ** 2, text_hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[tiles, patches, vision_hidden] -> [tiles, patches / scale², text_hidden]."""
        return self.modality_projection(self.pixel_shuffle(patches))

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[tiles, side * side, dim] -> [tiles, (side / s)², dim * s²], in transformers' order:
        each output token stacks s columns, then s rows, of neighbouring patches."""
        tiles, seq, dim = x.shape
        side, s = int(seq ** 0.5), self.scale_factor
        x = x.reshape(tiles, side, side // s, dim * s)        # s neighbours along a row
        x = x.permute(0, 2, 1, 3).reshape(tiles, side // s, side // s, dim * s * s)   # and s rows
        return x.permute(0, 2, 1, 3).reshape(tiles, seq // (s * s), dim * s * s)


class Idefics3Model(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        hf = config.hf_config
        vision = VisionConfig.from_hf(hf.get("vision_config") or {}, SIGLIP_DEFAULTS)
        self.vision_model = SiglipVisionTransformer(vision)
        self.connector = Idefics3Connector(vision.hidden_size, config.hidden_size, int(hf.get("scale_factor", 2)))
        self.text_model = LlamaModel(config, max_positions)


class Idefics3ForConditionalGeneration(nn.Module):
    VISION_MODULES = ("model.vision_model", "model.connector")   # run per image, not per token

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        if config.image_token_id is None:
            raise ValueError("an idefics3 config needs image_token_id")
        self.config = config
        self.image_token_id = config.image_token_id
        self.model = Idefics3Model(config, max_positions or config.max_position_embeddings)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [tokens] (or inputs_embeds [tokens, hidden], image rows in
        place) -> hidden states [tokens, hidden]."""
        return self.model.text_model(input_ids, positions, meta, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[tokens] -> [tokens, hidden]: the text embeddings, image tokens' rows still to replace."""
        return self.model.text_model.embed_tokens(input_ids)

    def encode_image(self, pixel_values: torch.Tensor,
                     pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One image's tiles [tiles, 3, H, W] (the global view last, as the processor orders
        them) and its pixel mask [tiles, H, W] (True: a real pixel; None: no padding) ->
        [tiles * tokens_per_tile, hidden]: the rows of its image tokens, in prompt order."""
        vision = self.model.vision_model
        pixel_values = pixel_values.to(vision.embeddings.patch_embedding.weight)
        mask = None
        if pixel_attention_mask is not None:
            mask = patch_mask(pixel_attention_mask.to(pixel_values.device), vision.config.patch_size)
        return self.model.connector(vision(pixel_values, mask)).flatten(0, 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [sequences, hidden] (last positions only) -> logits [sequences, vocab] fp32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, WeightValue]]) -> None:
        load_named_weights(self, without_tied_head(self.config, weights), skip=("rotary_emb.inv_freq",))
        finish_loading(self, self.model.text_model)
