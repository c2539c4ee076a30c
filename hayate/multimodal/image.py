"""Decode one user image safely: size limits before pixels, one-line errors, RGB out."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# The MIME types a data: URI may declare for each format Pillow detects.
_MIME_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
_MB = 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * _MB       # per image
    max_pixels: int = 33_000_000    # per image, checked from the header before decoding pixels
    max_images: int = 5             # per request (callers use check_image_count)
    min_side: int = 2               # HF processors cannot tell the channel axis of a 1x1 image


class MediaError(ValueError):
    """A user's image or image reference is unusable; `status` is the HTTP status (400, or 413 for size)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image   # RGB, EXIF orientation applied, first frame of animations, fully loaded
    content_hash: str    # sha256 hex of the raw bytes (the encoder-cache key)
    format: str          # "PNG" | "JPEG" | "WEBP" | "GIF"
    num_bytes: int
    load_seconds: float = 0.0   # reading or fetching, and decoding (set by hayate.multimodal.media)


def check_image_count(count: int, limits: ImageLimits) -> None:
    if count > limits.max_images:
        raise MediaError(f"too many images in one request: {count}; the limit is {limits.max_images}")


def check_byte_size(num_bytes: int, limits: ImageLimits, estimated: bool = False) -> None:
    """413 when an image (or a cheap estimate of its size) is over the byte limit."""
    if num_bytes > limits.max_bytes:
        about = "about " if estimated else ""
        raise MediaError(
            f"the image is too large: {about}{num_bytes:,} bytes received; "
            f"the limit is {limits.max_bytes / _MB:g} MB",
            status=413,
        )


def decode_image(data: bytes, limits: ImageLimits, declared_mime: str | None = None) -> DecodedImage:
    """Check `data` against `limits` and decode it to an upright RGB image."""
    check_byte_size(len(data), limits)
    with _open(data) as opened:
        image_format = opened.format or ""
        _check_declared_mime(image_format, declared_mime)
        _check_dimensions(opened.size, limits)
        _load_pixels(opened)
        rgb = _to_upright_rgb(opened)
    return DecodedImage(
        image=rgb,
        content_hash=hashlib.sha256(data).hexdigest(),
        format=image_format,
        num_bytes=len(data),
    )


def _open(data: bytes) -> Image.Image:
    """Read the header only; Pillow's own bomb check runs here (on its global limit, left untouched)."""
    try:
        return Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except Image.DecompressionBombError as error:
        raise MediaError(f"the image declares too many pixels to decode safely ({error})") from None
    except Exception:
        # Pillow raises many types for garbage; the user only needs to know it is unusable.
        raise MediaError(
            "unsupported or corrupt image data; expected PNG, JPEG, WEBP or GIF"
        ) from None


def _check_declared_mime(image_format: str, declared_mime: str | None) -> None:
    if declared_mime is None:
        return
    mime = declared_mime.split(";", 1)[0].strip().lower()
    if _MIME_FORMATS.get(mime) != image_format:
        raise MediaError(f"the image is {image_format} data but was declared {declared_mime}")


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    """Header size only: a decompression bomb is refused before any pixel is inflated."""
    width, height = size
    if width * height > limits.max_pixels:
        raise MediaError(
            f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:.1f} megapixels"
        )
    if min(width, height) < limits.min_side:
        raise MediaError(
            f"the image is {width}x{height}; each side must be at least {limits.min_side} pixels"
        )


def _load_pixels(opened: Image.Image) -> None:
    try:
        opened.load()  # first frame only for GIF / animated WEBP
    except Image.DecompressionBombError as error:
        raise MediaError(f"the image declares too many pixels to decode safely ({error})") from None
    except Exception:
        # Truncated files raise OSError; damaged ones a mix of others.
        raise MediaError("the image data is truncated or corrupt") from None


def _to_upright_rgb(opened: Image.Image) -> Image.Image:
    """EXIF rotation, then exactly transformers' `convert_to_rgb` (alpha composited onto white)."""
    try:
        upright = ImageOps.exif_transpose(opened)
        return _convert_to_rgb(upright)
    except Exception:
        raise MediaError("the image data is truncated or corrupt") from None


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    # Mirrors transformers.image_transforms.convert_to_rgb for PIL input, so pixels match HF processors.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
