"""Hugging Face model folders: config.json plus one or many *.safetensors shards."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open


class FolderError(ValueError):
    """A model folder that cannot be loaded; the message is meant for the user."""


class SafetensorsFolder:
    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FolderError(f"{self.path} has no config.json; expected a Hugging Face model folder")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FolderError(f"{config_path} is not valid JSON: {error}") from None
        self.shards = self._find_shards()

    def _find_shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = [self.path / name for name in sorted(set(weight_map.values()))]
        else:
            shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise FolderError(f"{self.path} has no *.safetensors weights")
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise FolderError(f"missing weight shard {missing[0]}")
        return shards

    def __len__(self) -> int:
        return sum(len(handle.keys()) for handle in self._open_shards())

    def _open_shards(self) -> Iterator:
        """Each shard opened in turn (memory-mapped), with a clear error for a broken one."""
        for shard in self.shards:
            try:
                handle = safe_open(shard, framework="pt")
            except (SafetensorError, OSError) as error:
                raise FolderError(f"{shard} is not a readable safetensors file: {error}") from None
            with handle:
                yield handle

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, fp32 tensor) for every weight, one shard open at a time."""
        for handle in self._open_shards():
            for name in handle.keys():
                yield name, handle.get_tensor(name).float()

    def dequantized_nbytes(self) -> int:
        """Size of all weights in fp32."""
        return sum(4 * math.prod(handle.get_slice(name).get_shape())
                   for handle in self._open_shards() for name in handle.keys())
