"""What the bf16 vision encoder (`--vision-precision bf16`) changes: greedy answers and image
embeddings against the fp32 encoder (the default, exact), on a random folder of a real model's
shape (bench/vision_models.py), several images times several questions, at each detail.

    .venv/bin/python bench/vision_exactness.py [--shape smolvlm] [--images 8] [--details low,high]
        [--max-tokens 24] [--threads 2]

Both engines load the same folder; only the encoder's precision differs. A random model's
logits are nearly flat, so its greedy answers flip on smaller differences than a trained
model's would: this is a severe test of the rounding, not a mild one."""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from hayate.llm import LLM
from hayate.multimodal.image import ImageLimits, decode_image
from hayate.sampling import SamplingParams
from vision_models import SHAPES, make_folder, photo

QUESTIONS = ("What is in this picture?", "Describe the colours you see, one by one.",
             "Write a short caption for this image.")
SIZES = ((640, 480), (480, 640), (800, 600), (512, 512), (1024, 576), (300, 200), (720, 720), (1280, 960))


def answers(llm: LLM, images: list[bytes], detail: str, max_tokens: int) -> tuple[list, list[torch.Tensor]]:
    """Greedy results (token ids, each step's top two logprobs) for every (image, question), and
    each image's embeddings."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)
    tokens, embeddings = [], []
    cache = llm.engine.runner.images.cache
    for data in images:
        image = decode_image(data, ImageLimits())
        for question in QUESTIONS:
            content = [{"type": "image", "image": image, "detail": detail}, {"type": "text", "text": question}]
            tokens.append(llm.chat([{"role": "user", "content": content}], params))
        view = llm.processor.process(image.image, image.content_hash, detail)
        embeddings.append(cache.get(view.cache_key).float())
    return tokens, embeddings


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def gap(result, index: int) -> float:
    """The fp32 run's logprob margin between its two likeliest tokens where the answers part."""
    top = result.logprobs[index].top
    return top[0][1] - top[1][1] if len(top) > 1 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smolvlm")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--details", type=lambda text: text.split(","), default=["low", "high"])
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = [photo(SIZES[i % len(SIZES)], seed=100 + i) for i in range(args.images)]
    print(f"{args.shape}-shaped random model, {args.images} images x {len(QUESTIONS)} questions, "
          f"{args.max_tokens} greedy tokens each\n")
    print("| detail | answers identical to fp32 | first difference at token (median) "
          "| fp32's top-2 logprob gap there (largest) | embedding cosine, min | mean |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="hayate-vision-exactness-") as folder:
        make_folder(args.shape, Path(folder))
        engines = {precision: LLM(folder, threads=args.threads, max_model_len=8192, vision_precision=precision,
                                  encoder_cache_mb=2048) for precision in ("fp32", "bf16")}
        for detail in args.details:
            exact_tokens, exact_embeddings = answers(engines["fp32"], images, detail, args.max_tokens)
            fast_tokens, fast_embeddings = answers(engines["bf16"], images, detail, args.max_tokens)
            parted = [(a, i) for a, b in zip(exact_tokens, fast_tokens)
                      if (i := first_difference(a.token_ids, b.token_ids)) is not None]
            where = [i for _, i in parted]
            largest_gap = max((gap(a, i) for a, i in parted), default=None)
            cosines = torch.cat([F.cosine_similarity(a, b, dim=-1) for a, b in zip(exact_embeddings, fast_embeddings)])
            print(f"| {detail} | {len(exact_tokens) - len(parted)} / {len(exact_tokens)} "
                  f"| {statistics.median(where) if where else '-'} "
                  f"| {'-' if largest_gap is None else f'{largest_gap:.4f}'} "
                  f"| {cosines.min():.6f} | {cosines.mean():.6f} |")


if __name__ == "__main__":
    main()
