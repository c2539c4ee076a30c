"""decode_image: formats, modes, orientation and limits, checked against transformers' own loading."""
import base64
import hashlib
import io
import time

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from image_samples import encode, noise, png_with_header_only
from hayate.multimodal.image import (
    DecodedImage,
    ImageLimits,
    MediaError,
    check_image_count,
    decode_image,
)

LIMITS = ImageLimits()


def gradient(mode: str, size=(24, 16)) -> Image.Image:
    """A non-uniform RGB(A) picture, converted to `mode`, so pixel mix-ups show."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    channels = [xs * 10 % 256, ys * 15 % 256, (xs + ys) * 7 % 256, (xs * ys) % 256]
    rgba = Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGBA")
    if mode in ("RGBA", "LA"):
        return rgba.convert(mode)
    return rgba.convert("RGB").convert(mode)


def hf_processor_pixels(data: bytes) -> np.ndarray:
    """What an HF image processor sees for these bytes: upright, then its convert_to_rgb."""
    raw = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return convert_to_rgb(raw, return_numpy=True)


def hf_load_image_pixels(data: bytes) -> np.ndarray:
    """transformers.image_utils.load_image on the same bytes (as base64, its in-memory form)."""
    return np.asarray(load_image(base64.b64encode(data).decode()))


def assert_decodes_like_transformers(data: bytes, opaque: bool) -> DecodedImage:
    decoded = decode_image(data, LIMITS)
    assert decoded.image.mode == "RGB"
    pixels = np.asarray(decoded.image)
    np.testing.assert_array_equal(pixels, hf_processor_pixels(data))
    if opaque:  # load_image drops alpha without compositing, so it only agrees on opaque images
        np.testing.assert_array_equal(pixels, hf_load_image_pixels(data))
    return decoded


@pytest.mark.parametrize(
    "image_format, mode",
    [("PNG", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("GIF", "P"), ("PNG", "L"), ("JPEG", "L"),
     ("JPEG", "CMYK"), ("PNG", "P"), ("PNG", "I;16"), ("WEBP", "RGBA"), ("PNG", "RGBA"), ("PNG", "LA")],
)
def test_each_format_and_mode_matches_transformers(image_format, mode):
    data = encode(gradient(mode), image_format)
    decoded = assert_decodes_like_transformers(data, opaque="A" not in mode)
    assert decoded.format == image_format
    assert decoded.image.size == (24, 16)
    assert decoded.num_bytes == len(data)
    assert decoded.content_hash == hashlib.sha256(data).hexdigest()


def test_full_range_16_bit_png_matches_transformers():
    levels = np.linspace(0, 65535, 24 * 16).reshape(16, 24).astype(np.uint16)
    data = encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert_decodes_like_transformers(data, opaque=True)


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    decoded = decode_image(encode(image, "PNG"), LIMITS)
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)


def test_palette_png_with_transparency_matches_transformers():
    image = gradient("P")
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    assert_decodes_like_transformers(data, opaque=False)


def test_exif_orientation_is_applied():
    image = gradient("RGB", size=(32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = encode(image, "JPEG", exif=exif)
    decoded = assert_decodes_like_transformers(data, opaque=True)
    assert decoded.image.size == (16, 32)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(upright))


def test_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    decoded = assert_decodes_like_transformers(data, opaque=True)
    assert decoded.image.getpixel((3, 3)) == (255, 0, 0)


@pytest.fixture
def load_calls(monkeypatch):
    """Records every pixel decode, to prove limits are checked from the header alone."""
    calls = []
    original = ImageFile.ImageFile.load

    def recording_load(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return calls


@pytest.mark.parametrize("side", [6000, 30000])  # ours refuses 36 MP; Pillow's own guard 900 MP
def test_decompression_bomb_is_refused_from_the_header(side, load_calls):
    data = png_with_header_only(side, side)
    assert len(data) < 500
    pillow_limit = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    with pytest.raises(MediaError) as caught:
        decode_image(data, LIMITS)
    print(f"{side}x{side} bomb refused in {(time.perf_counter() - started) * 1e3:.2f} ms")
    assert caught.value.status == 400
    assert "pixels" in str(caught.value)
    assert load_calls == []
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_pixel_limit_names_megapixels_and_size(load_calls):
    data = encode(gradient("RGB", size=(40, 30)), "PNG")
    with pytest.raises(MediaError) as caught:
        decode_image(data, ImageLimits(max_pixels=1000))
    assert caught.value.status == 400
    assert "40x30" in str(caught.value) and "megapixels" in str(caught.value)
    assert load_calls == []


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_images_below_the_minimum_side_are_refused(size):
    with pytest.raises(MediaError) as caught:
        decode_image(encode(Image.new("RGB", size), "PNG"), LIMITS)
    assert caught.value.status == 400
    assert "at least 2 pixels" in str(caught.value)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_image_is_refused(image_format):
    data = encode(noise(), image_format)
    with pytest.raises(MediaError) as caught:
        decode_image(data[: len(data) // 2], LIMITS)
    assert caught.value.status == 400
    assert str(caught.value) == "the image data is truncated or corrupt"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n garbage"])
def test_garbage_is_refused(data):
    with pytest.raises(MediaError) as caught:
        decode_image(data, LIMITS)
    assert caught.value.status == 400
    assert str(caught.value).startswith("unsupported or corrupt image data")


@pytest.mark.parametrize("image_format", ["BMP", "TIFF", "ICO"])
def test_formats_outside_the_four_are_refused(image_format):
    with pytest.raises(MediaError, match="unsupported or corrupt image data"):
        decode_image(encode(gradient("RGB"), image_format), LIMITS)


def test_declared_mime_must_match_the_data():
    png = encode(gradient("RGB"), "PNG")
    with pytest.raises(MediaError) as caught:
        decode_image(png, LIMITS, declared_mime="image/jpeg")
    assert caught.value.status == 400
    assert str(caught.value) == "the image is PNG data but was declared image/jpeg"
    assert decode_image(png, LIMITS, declared_mime="image/png").format == "PNG"


@pytest.mark.parametrize("mime", ["image/jpeg", "image/jpg", "IMAGE/JPEG"])
def test_jpeg_mime_aliases_are_accepted(mime):
    assert decode_image(encode(gradient("RGB"), "JPEG"), LIMITS, declared_mime=mime).format == "JPEG"


def test_over_the_byte_limit_is_413_before_decoding(load_calls):
    data = encode(noise(), "PNG")
    with pytest.raises(MediaError) as caught:
        decode_image(data, ImageLimits(max_bytes=1024))
    assert caught.value.status == 413
    assert f"{len(data):,} bytes" in str(caught.value) and "MB" in str(caught.value)
    assert load_calls == []


def test_error_messages_are_one_line():
    cases = [b"junk", encode(noise(), "JPEG")[:300], png_with_header_only(30000, 30000)]
    for data in cases:
        with pytest.raises(MediaError) as caught:
            decode_image(data, LIMITS)
        assert "\n" not in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_check_image_count():
    check_image_count(5, LIMITS)
    with pytest.raises(MediaError) as caught:
        check_image_count(6, LIMITS)
    assert caught.value.status == 400
    assert "6" in str(caught.value) and "5" in str(caught.value)
