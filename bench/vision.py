"""Time to first token with one image, hayate beside transformers on the same random folder of
a real model's shape (bench/vision_models.py), threads and image, at each `detail` and each of
hayate's encoder precisions, with hayate's per-stage breakdown.

    .venv/bin/python bench/vision.py [--shape smolvlm|llava] [--threads 2] [--repeats 2]
        [--image-size 640x480] [--details low,high] [--precisions fp32,bf16]

Times are wall clock from the raw image bytes to the first token (decoding, processing,
encoding, prefill), median of --repeats, each repeat a new random photo (the encoder cache
never answers; its row is measured apart), the engines' requests interleaved. transformers
runs its processor with splitting off for `low` (what hayate's low is) and its default for
`high`."""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image

from hayate.llm import LLM
from hayate.multimodal.image import ImageLimits, decode_image
from hayate.sampling import SamplingParams
from vision_models import SHAPES, make_folder, photo

QUESTION = "What is in this picture? Describe it in one sentence."
STAGES = ("decode", "preprocess", "encode", "prefill")


@dataclass
class Row:
    label: str
    ttft: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    prompt_tokens: int = 0

    def median(self, values: list[float] | None = None) -> float:
        return statistics.median(self.ttft if values is None else values) * 1000


def hayate_request(llm: LLM, image: bytes | None, detail: str, row: Row) -> None:
    """One request, its times added to `row`."""
    started = time.perf_counter()
    content: list[dict] = [{"type": "text", "text": QUESTION}]
    if image is not None:
        decoded = decode_image(image, ImageLimits())
        row.stages["decode"].append(time.perf_counter() - started)
        content.insert(0, {"type": "image", "image": decoded, "detail": detail})
    result = llm.chat([{"role": "user", "content": content}], SamplingParams(max_tokens=1, temperature=0))
    row.ttft.append(time.perf_counter() - started)
    row.prompt_tokens = result.num_prompt_tokens
    timings = result.timings
    if timings.images is not None:
        row.stages["preprocess"].append(timings.images.preprocess)
        row.stages["encode"].append(timings.images.encode)
        row.stages["prefill"].append(timings.first_token - timings.first_scheduled - timings.images.encode)


def transformers_request(model, processor, image: bytes | None, detail: str, row: Row) -> None:
    started = time.perf_counter()
    content: list[dict] = [{"type": "text", "text": QUESTION}]
    options = {}
    if image is not None:
        content.insert(0, {"type": "image"})
        options = {"images": [Image.open(io.BytesIO(image)).convert("RGB")]}
        if detail == "low" and isinstance(processor, transformers.Idefics3Processor):
            options["do_image_splitting"] = False
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt", **options)
    with torch.inference_mode():
        model(**inputs).logits[0, -1].argmax()
    row.ttft.append(time.perf_counter() - started)
    row.prompt_tokens = int(inputs["input_ids"].shape[1])


def measure(folder: str, model, args, size: tuple[int, int]) -> list[Row]:
    """Every engine loaded at once and the requests interleaved (each repeat's photo through
    hayate at each precision, then transformers), so a slower minute of a shared machine
    falls on all of them alike."""
    engines = {precision: LLM(folder, threads=args.threads, max_model_len=8192, vision_precision=precision)
               for precision in args.precisions}
    processor = transformers.AutoProcessor.from_pretrained(folder)
    rows: dict[str, Row] = {}

    def row(label: str) -> Row:
        return rows.setdefault(label, Row(label))

    for precision, llm in engines.items():
        hayate_request(llm, photo(size, seed=99), "low", Row("warm-up"))
    transformers_request(model, processor, photo(size, seed=98), "low", Row("warm-up"))
    for _ in range(args.repeats):
        for precision, llm in engines.items():
            hayate_request(llm, None, "high", row(f"hayate {precision}, no image"))
        transformers_request(model, processor, None, "high", row("transformers, no image"))
    for detail in args.details:
        for seed in range(args.repeats):
            image = photo(size, seed=seed)
            for precision, llm in engines.items():
                hayate_request(llm, image, detail, row(f"hayate {precision}, {detail}"))
                hayate_request(llm, image, detail, row(f"hayate {precision}, {detail}, image cached"))
            transformers_request(model, processor, image, detail, row(f"transformers, {detail}"))
    return sorted(rows.values(), key=lambda r: (r.label.startswith("transformers"), r.label))


def report(rows: list[Row], args, size: tuple[int, int]) -> None:
    print(f"\n{args.shape}-shaped random model, {size[0]}x{size[1]} JPEG, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| request | prompt tokens | time to first token (ms) | " + " | ".join(STAGES) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(STAGES))
    for row in rows:
        stages = [f"{row.median(row.stages[s]):.0f}" if row.stages[s] else "" for s in STAGES]
        print(f"| {row.label} | {row.prompt_tokens} | {row.median():.0f} | " + " | ".join(stages) + " |")
    by_label = {row.label: row for row in rows}
    print()
    for detail in args.details:
        reference = by_label[f"transformers, {detail}"].median()
        for precision in args.precisions:
            ours = by_label[f"hayate {precision}, {detail}"].median()
            print(f"{detail}: hayate {precision} / transformers = {ours / reference:.3f} "
                  f"({ours:.0f} / {reference:.0f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smolvlm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", default="640x480")
    parser.add_argument("--details", type=lambda text: text.split(","), default=["low", "high"])
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=["fp32", "bf16"])
    args = parser.parse_args()
    size = tuple(int(side) for side in args.image_size.split("x"))
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hayate-vision-bench-") as folder:
        model = make_folder(args.shape, Path(folder))
        rows = measure(folder, model, args, size)
    report(rows, args, size)


if __name__ == "__main__":
    main()
