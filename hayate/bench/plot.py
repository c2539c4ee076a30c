"""The bench's PNG, drawn with Pillow: decode tokens/s per engine (bars) and each engine's
inter-token latency distribution (cumulative curves)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from hayate.bench.timings import EngineResult, percentile

WIDTH, HEIGHT = 1000, 420
MARGIN = 60
COLORS = {"hayate": (214, 39, 40), "llama.cpp": (31, 119, 180), "transformers": (44, 160, 44)}
OTHER_COLOR = (120, 120, 120)
AXIS = (40, 40, 40)
GRID = (225, 225, 225)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:      # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _color(name: str) -> tuple[int, int, int]:
    return COLORS.get(name, OTHER_COLOR)


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, font) -> None:
    left, top, right, bottom = box
    draw.text((left, top - 28), title, fill=AXIS, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS, width=2)


def _bars(draw: ImageDraw.ImageDraw, box, engines: list[EngineResult], font) -> None:
    """One bar per engine, its tokens/s written above it."""
    left, top, right, bottom = box
    _axes(draw, box, "decode tokens/s (batch 1)", font)
    rates = [engine.decode_tokens_per_s or 0.0 for engine in engines]
    highest = max(rates + [1e-9])
    slot = (right - left) / max(len(engines), 1)
    for index, (engine, rate) in enumerate(zip(engines, rates)):
        x0 = left + index * slot + slot * 0.2
        x1 = left + (index + 1) * slot - slot * 0.2
        y0 = bottom - (bottom - top - 20) * rate / highest
        draw.rectangle([x0, y0, x1, bottom - 1], fill=_color(engine.name))
        draw.text((x0, y0 - 18), f"{rate:.1f}", fill=AXIS, font=font)
        draw.text((x0, bottom + 6), engine.name, fill=AXIS, font=font)


def _cdf(draw: ImageDraw.ImageDraw, box, engines: list[EngineResult], font) -> None:
    """Share of inter-token gaps at or below each latency, one curve per engine."""
    left, top, right, bottom = box
    _axes(draw, box, "inter-token latency: share of tokens at or below (ms)", font)
    samples = [value for engine in engines for value in engine.itl_samples_ms]
    if not samples:
        return
    span = max(percentile(samples, 99.5) * 1.1, 1e-6)
    for tick in range(5):
        x = left + (right - left) * tick / 4
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.text((x - 10, bottom + 6), f"{span * tick / 4:.1f}", fill=AXIS, font=font)
    for tick in (0.5, 0.9, 1.0):
        y = bottom - (bottom - top) * tick
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 30, y - 8), f"{tick:g}", fill=AXIS, font=font)
    for engine in engines:
        ordered = sorted(engine.itl_samples_ms)
        points = [(left + (right - left) * min(value / span, 1.0), bottom - (bottom - top) * (i + 1) / len(ordered))
                  for i, value in enumerate(ordered)]
        if len(points) > 1:
            draw.line(points, fill=_color(engine.name), width=3)


def _legend(draw: ImageDraw.ImageDraw, engines: list[EngineResult], font) -> None:
    """A colour swatch and name per engine, in one row at the top right."""
    x = WIDTH - 130 * len(engines)
    for engine in engines:
        draw.rectangle([x, 14, x + 14, 28], fill=_color(engine.name))
        draw.text((x + 20, 13), engine.name, fill=AXIS, font=font)
        x += 130


def draw_png(engines: list[EngineResult], path: Path, title: str) -> None:
    """Engines without figures (failed, skipped) are left out."""
    shown = [engine for engine in engines if engine.ok]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = _font(14)
    draw.text((MARGIN, 10), title, fill=AXIS, font=_font(16))
    split = WIDTH * 2 // 5
    _bars(draw, (MARGIN, 80, split - MARGIN // 2, HEIGHT - 50), shown, font)
    _cdf(draw, (split + MARGIN // 2, 80, WIDTH - MARGIN // 2, HEIGHT - 50), shown, font)
    _legend(draw, shown, font)
    image.save(path, format="PNG")
