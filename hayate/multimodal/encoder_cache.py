"""Image embeddings kept by content hash, so an image seen again (a later turn of a chat,
many users asking about one picture) skips the vision encoder."""
from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """Least recently used entries leave first once the embeddings pass `max_bytes`."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the encoder cache size must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, content_hash: str) -> torch.Tensor | None:
        embeddings = self._entries.get(content_hash)
        if embeddings is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(content_hash)
        return embeddings

    def put(self, content_hash: str, embeddings: torch.Tensor) -> None:
        size = embeddings.numel() * embeddings.element_size()
        if size > self.max_bytes or content_hash in self._entries:
            return
        self._entries[content_hash] = embeddings
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.num_bytes -= dropped.numel() * dropped.element_size()
