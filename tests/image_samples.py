"""Images made in the tests (no files in the repo): noise, encodings, data URIs, and a
decompression bomb of a few hundred bytes."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def noise(size=(64, 64), seed: int = 0) -> Image.Image:
    """Random RGB pixels, width x height = size."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, image_format: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_args)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_with_header_only(width: int, height: int) -> bytes:
    """A few hundred bytes whose IHDR declares width x height RGB pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
