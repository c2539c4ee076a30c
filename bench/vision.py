"""Time to first token with one image versus the same prompt without, on a random model of
SmolVLM-256M-Instruct's shape (SigLIP-512 encoder, pixel shuffle by 4, SmolLM2-135M text),
hayate beside transformers on the same folder, threads and image.

    .venv/bin/python bench/vision.py [--threads 2] [--repeats 3] [--image-size 640x480]

Times are wall clock around the whole request (image processing included), to the first
token. The image is a random photo-sized JPEG; SmolVLM's processor upscales its longest edge
to 2048 pixels and cuts it into 512-pixel tiles plus a global view (64 tokens each)."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from image_samples import encode, noise  # noqa: E402  (the test suite's image and folder makers)
from tiny_vlms import IMAGE_TOKEN_ID, SMOLVLM_CHAT_TEMPLATE, vlm_tokenizer  # noqa: E402

from hayate.llm import LLM  # noqa: E402
from hayate.multimodal.image import ImageLimits, decode_image  # noqa: E402
from hayate.sampling import SamplingParams  # noqa: E402

QUESTION = "What is in this picture? Describe it in one sentence."
SMOLVLM_256M_TEXT = dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
SMOLVLM_256M_VISION = dict(model_type="idefics3_vision", hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12, image_size=512, patch_size=16)


def make_folder(folder: Path) -> transformers.Idefics3ForConditionalGeneration:
    config = transformers.Idefics3Config(text_config=SMOLVLM_256M_TEXT, vision_config=SMOLVLM_256M_VISION,
                                         scale_factor=4, image_token_id=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, do_image_splitting=True)
    transformers.Idefics3Processor(image_processor=image_processor, tokenizer=vlm_tokenizer(SMOLVLM_CHAT_TEMPLATE),
                                   image_seq_len=64, chat_template=SMOLVLM_CHAT_TEMPLATE).save_pretrained(folder)
    return model


def photo(size: tuple[int, int], seed: int) -> bytes:
    return encode(noise(size, seed=seed), "JPEG", quality=90)


def hayate_ttft(llm: LLM, image: bytes | None) -> tuple[float, object]:
    """Seconds from raw bytes to the first token, and the request's timings."""
    started = time.perf_counter()
    content: list[dict] = [{"type": "text", "text": QUESTION}]
    if image is not None:
        content.insert(0, {"type": "image", "image": decode_image(image, ImageLimits())})
    result = llm.chat([{"role": "user", "content": content}], SamplingParams(max_tokens=1, temperature=0))
    return time.perf_counter() - started, result


def transformers_ttft(model, processor, image: bytes | None) -> float:
    from transformers.image_utils import load_image
    import io
    from PIL import Image

    started = time.perf_counter()
    content: list[dict] = [{"type": "text", "text": QUESTION}]
    images = None
    if image is not None:
        content.insert(0, {"type": "image"})
        images = [load_image(Image.open(io.BytesIO(image)))]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, images=images, return_tensors="pt")
    with torch.inference_mode():
        model(**inputs).logits[0, -1].argmax()
    return time.perf_counter() - started


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", default="640x480")
    args = parser.parse_args()
    size = tuple(int(side) for side in args.image_size.split("x"))
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hayate-vision-bench-") as tmp:
        hf_model = make_folder(Path(tmp))
        llm = LLM(tmp, threads=args.threads, max_model_len=4096)
        hayate_ttft(llm, photo(size, seed=99))   # warm-up
        rows = measure_hayate(llm, size, args.repeats)
        processor = transformers.AutoProcessor.from_pretrained(tmp)
        transformers_ttft(hf_model, processor, photo(size, seed=98))   # warm-up
        rows["transformers, no image"] = [transformers_ttft(hf_model, processor, None) for _ in range(args.repeats)]
        rows["transformers, one image"] = [transformers_ttft(hf_model, processor, photo(size, seed=i))
                                           for i in range(args.repeats)]
    report(rows, size, args)


def measure_hayate(llm: LLM, size: tuple[int, int], repeats: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {"hayate, no image": [], "hayate, one image": [],
                                    "hayate, same image again (encoder cache)": []}
    breakdown = []
    for seed in range(repeats):
        rows["hayate, no image"].append(hayate_ttft(llm, None)[0])
        seconds, result = hayate_ttft(llm, photo(size, seed=seed))
        rows["hayate, one image"].append(seconds)
        breakdown.append((result.num_prompt_tokens, result.timings.images))
        rows["hayate, same image again (encoder cache)"].append(hayate_ttft(llm, photo(size, seed=seed))[0])
    tokens, images = breakdown[0]
    print(f"one image: {tokens} prompt tokens; preprocess {median_ms([b[1].preprocess for b in breakdown]):.0f} ms, "
          f"encode {median_ms([b[1].encode for b in breakdown]):.0f} ms (hayate, median)")
    return rows


def report(rows: dict[str, list[float]], size: tuple[int, int], args) -> None:
    print(f"\nSmolVLM-256M-shaped random model, {size[0]}x{size[1]} JPEG, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| request | time to first token (ms) |\n| --- | ---: |")
    for name, values in rows.items():
        print(f"| {name} | {median_ms(values):.0f} |")
    ratio = median_ms(rows["hayate, one image"]) / median_ms(rows["transformers, one image"])
    print(f"\nhayate / transformers with one image: {ratio:.2f}")


if __name__ == "__main__":
    main()
