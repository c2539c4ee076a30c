"""Image processors: an RGB picture in, the pixel tiles and prompt text one model expects out.

Each model's processor reproduces transformers' PIL image processor step by step (same
resampling, same uint8 round trips, same float64 rescale then float32 normalize), because the
checkpoints were trained on exactly those numbers. Only numpy and PIL are used here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import PIL.Image

from hayate.multimodal.features import ImageDetail, ImageFeatures

IMAGE_MARKER = "<image>"  # what the chat templates of SmolVLM and LLaVA write for an image part


class ImageProcessor(Protocol):
    """What the engine needs from a model's image processor."""
    image_token: str    # the marker the chat template writes for an image
    image_token_id: int  # the id whose rows the vision encoder's output replaces

    def process(self, image: PIL.Image.Image, content_hash: str, detail: ImageDetail = "high") -> ImageFeatures:
        """Pixel tiles and prompt placeholder for one image, seen at `detail` (OpenAI's:
        "low" one view at the encoder's size, "high" the model's full tiling, "auto" by size)."""
        ...

    def expand_prompt(self, text: str, images: list[ImageFeatures]) -> str:
        """`text` with its i-th marker replaced by images[i].placeholder."""
        ...


def load_processor(folder: Path, hf_config: dict) -> ImageProcessor | None:
    """The image processor a Hugging Face folder describes; None for a text-only model."""
    # Imported here: the model modules import this one's helpers.
    from hayate.multimodal.idefics3 import Idefics3Processor
    from hayate.multimodal.llava import LlavaProcessor

    builders = {"idefics3": Idefics3Processor.from_configs, "llava": LlavaProcessor.from_configs}
    build = builders.get(hf_config.get("model_type", ""))
    if build is None:
        return None
    preprocessor, processor = read_processor_configs(Path(folder))
    return build(preprocessor, processor, hf_config)


def read_processor_configs(folder: Path) -> tuple[dict, dict]:
    """(image processor settings, processor settings) from a model folder.

    Hub folders keep the image settings in preprocessor_config.json and the processor's own
    (image_seq_len, patch_size, ...) in processor_config.json; transformers 5 saves both in
    processor_config.json, the image settings nested under "image_processor"."""
    processor = _read_json(folder / "processor_config.json")
    nested = processor.pop("image_processor", None) or {}
    preprocessor = _read_json(folder / "preprocessor_config.json") or nested
    return preprocessor, processor


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, with any transparency composited onto white (transformers' convert_to_rgb)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def expand_markers(text: str, marker: str, images: list[ImageFeatures]) -> str:
    """Replace the i-th `marker` in `text` by images[i].placeholder."""
    pieces = text.split(marker)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"the prompt has {len(pieces) - 1} image marker(s) {marker!r} "
                         f"but {len(images)} image(s) were given")
    expanded = [pieces[0]]
    for image, piece in zip(images, pieces[1:]):
        expanded += [image.placeholder, piece]
    return "".join(expanded)


@dataclass
class PixelSteps:
    """The steps every processor ends with: resampling filter, rescale, normalize."""
    resample: PIL.Image.Resampling
    rescale_factor: float | None         # None when do_rescale is off
    image_mean: tuple[float, ...] | None  # None when do_normalize is off
    image_std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, config: dict, resample: PIL.Image.Resampling,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> "PixelSteps":
        """Settings from an image processor config, with the processor class's defaults."""
        do_rescale, do_normalize = config.get("do_rescale", True), config.get("do_normalize", True)
        return cls(resample=PIL.Image.Resampling(config.get("resample", resample)),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)) if do_rescale else None,
                   image_mean=_triple(config.get("image_mean", mean)) if do_normalize else None,
                   image_std=_triple(config.get("image_std", std)) if do_normalize else None)

    def resize(self, image: PIL.Image.Image, height: int, width: int) -> PIL.Image.Image:
        return image.resize((width, height), resample=self.resample)

    def to_array(self, pixels: np.ndarray) -> np.ndarray:
        """[height, width, 3] uint8 -> [3, height, width] float32, as transformers' rescale
        (in float64, then cast) and normalize (in float32) compute it."""
        values = pixels.astype(np.float32)
        if self.rescale_factor is not None:
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.image_mean is not None:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            values = (values - mean) / std
        return np.ascontiguousarray(values.transpose(2, 0, 1))


def _triple(value) -> tuple[float, float, float]:
    """A per-channel setting, which configs may also give as one number."""
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
    if len(values) != 3:
        raise ValueError(f"image_mean / image_std need 3 values (RGB), got {value!r}")
    return values[0], values[1], values[2]
