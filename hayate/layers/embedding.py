"""An embedding table kept in its GGUF blocks: a lookup decodes only the rows it reads, so a
150k-token table costs its file bytes (mapped, paged in as its tokens appear), not 4 bytes a
value, and no load-time pass over it."""
from __future__ import annotations

import torch
from torch import nn

from hayate.layers.quant import PackedWeight, QType, dequantize


class PackedEmbedding(nn.Module):
    def __init__(self, weight: PackedWeight):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.ggml_type = int(weight.ggml_type)
        self.register_buffer("packed", weight.data.reshape(self.num_embeddings, -1))   # [vocab, bytes per row]

    @property
    def weight(self) -> PackedWeight:
        return PackedWeight(self.packed, self.ggml_type, (self.num_embeddings, self.embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [...] -> fp32 [..., embedding_dim]: the rows decoded exactly as the whole
        table would be (each row on its own)."""
        ids = input_ids.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        rows = self.packed.index_select(0, ids.to(self.packed.device))
        values = dequantize(rows, self.ggml_type, (ids.numel(), self.embedding_dim))
        return values.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={QType(self.ggml_type).name}"
