"""hayate's image processors against transformers' own (PIL) processors, on tiny VLM folders:
the same pixels bit for bit, the same masks, the same prompt token ids."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from hayate.loading.chat_template import ChatTemplate
from hayate.loading.tokenizer import Tokenizer
from hayate.multimodal.idefics3 import Idefics3Processor
from hayate.multimodal.llava import LlavaProcessor
from hayate.multimodal.processor import load_processor
from tiny_vlms import (IMAGE_TOKEN, IMAGE_TOKEN_ID, hf_processor, make_tiny_vlm, save_tiny_processor,
                       tiny_idefics3_config, tiny_llava_config)

HF_CONFIGS = {"idefics3": tiny_idefics3_config, "llava": tiny_llava_config}
# kind + image processor options: the folders make_tiny_vlm writes, and the other settings
VARIANTS = {
    "idefics3": ("idefics3", {}),
    "idefics3_unsplit": ("idefics3", {"do_image_splitting": False}),
    "llava": ("llava", {}),
    "llava_pad": ("llava", {"do_pad": True}),
}
RGB_SIZES = [(5, 7), (64, 64), (100, 37), (37, 100), (200, 150), (300, 300), (129, 128), (400, 9)]


def _noise(rng, width, height, channels):
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _images() -> dict[str, PIL.Image.Image]:
    """Noise (the hardest case for resampling) in the modes a request may carry."""
    rng = np.random.default_rng(0)
    images = {f"rgb_{w}x{h}": PIL.Image.fromarray(_noise(rng, w, h, 3)) for w, h in RGB_SIZES}
    images["gray_120x80"] = PIL.Image.fromarray(_noise(rng, 120, 80, 1)[..., 0], mode="L")
    images["rgba_90x60"] = PIL.Image.fromarray(_noise(rng, 90, 60, 4), mode="RGBA")
    palette = PIL.Image.fromarray(_noise(rng, 70, 50, 1)[..., 0] % 16, mode="P")
    palette.putpalette(list(_noise(rng, 16, 1, 3).flatten()))
    palette.info["transparency"] = 3
    images["palette_transparent_70x50"] = palette
    return images


IMAGES = _images()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant -> (folder, hf_config dict); the base kinds are whole tiny models."""
    result = {}
    for variant, (kind, options) in VARIANTS.items():
        folder = tmp_path_factory.mktemp(variant)
        if options:
            save_tiny_processor(kind, folder, **options)
            hf_config = HF_CONFIGS[kind]().to_dict()
        else:
            make_tiny_vlm(kind, folder)
            hf_config = json.loads((folder / "config.json").read_text())
        result[variant] = (folder, hf_config)
    return result


@pytest.fixture(scope="module")
def processors(folders):
    """variant -> (ours, transformers', hayate tokenizer)."""
    return {variant: (load_processor(folder, hf_config), hf_processor(folder), Tokenizer.from_folder(folder))
            for variant, (folder, hf_config) in folders.items()}


def _ids(ours, tokenizer, text, images):
    return tokenizer.encode(ours.expand_prompt(text, images), add_special_tokens=False)


def _check_tiles(features, reference_pixels, reference_mask):
    """Our tiles equal transformers' first len(tiles) entries; the rest is its batch padding."""
    count = features.pixel_values.shape[0]
    assert features.pixel_values.dtype == torch.float32
    assert torch.equal(features.pixel_values, reference_pixels[:count])
    assert not reference_pixels[count:].any()
    if reference_mask is None:
        assert features.pixel_attention_mask is None
    else:
        assert torch.equal(features.pixel_attention_mask, reference_mask[:count].bool())
        assert not reference_mask[count:].any()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("image_name", IMAGES)
def test_one_image_matches_transformers(processors, variant, image_name):
    ours, theirs, tokenizer = processors[variant]
    image = IMAGES[image_name]
    text = f"Look:{IMAGE_TOKEN} what is it?"
    reference = theirs(images=[image], text=text, add_special_tokens=False, return_tensors="pt")
    features = ours.process(image, content_hash="abc")
    pixels = reference["pixel_values"]
    mask = reference.get("pixel_attention_mask")
    _check_tiles(features, pixels[0] if isinstance(ours, Idefics3Processor) else pixels,
                 None if mask is None else mask[0])
    assert features.content_hash == "abc"
    ids = _ids(ours, tokenizer, text, [features])
    assert ids == reference["input_ids"][0].tolist()
    assert ids.count(IMAGE_TOKEN_ID) == features.num_image_tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_prompts_with_two_images(processors, variant):
    """Two prompts (one and two images): transformers pads tiles across the batch; per image
    and per prompt the results must still match."""
    ours, theirs, tokenizer = processors[variant]
    names = [["rgb_200x150"], ["rgb_5x7", "rgb_37x100"]]
    texts = [f"a{IMAGE_TOKEN}b", f"{IMAGE_TOKEN}c\n{IMAGE_TOKEN}d"]
    reference = theirs(images=[[IMAGES[n] for n in row] for row in names], text=texts, add_special_tokens=False)
    pixels = torch.as_tensor(np.asarray(reference["pixel_values"]))
    masks = reference.get("pixel_attention_mask")
    for sample, (row, text) in enumerate(zip(names, texts)):
        features = [ours.process(IMAGES[name], name) for name in row]
        assert _ids(ours, tokenizer, text, features) == reference["input_ids"][sample]
        if isinstance(ours, Idefics3Processor):
            all_tiles = torch.cat([f.pixel_values for f in features])
            mask = torch.as_tensor(np.asarray(masks[sample]))
            assert torch.equal(all_tiles, pixels[sample][:len(all_tiles)])
            assert torch.equal(torch.cat([f.pixel_attention_mask for f in features]), mask[:len(all_tiles)].bool())
            assert not pixels[sample][len(all_tiles):].any() and not mask[len(all_tiles):].any()
    if isinstance(ours, LlavaProcessor):  # one tile per image, all prompts' images in order
        flat = [ours.process(IMAGES[name], name).pixel_values for row in names for name in row]
        assert torch.equal(torch.cat(flat), pixels)


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_chat_template_prompt_matches_transformers(processors, kind):
    """The folder's template writes the marker our expansion replaces, as transformers' does."""
    ours, theirs, tokenizer = processors[kind]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                             {"type": "image"}]}]
    prompt = ChatTemplate.for_tokenizer(tokenizer).render(messages, add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [IMAGES["rgb_300x300"], IMAGES["gray_120x80"]]
    reference = theirs(images=images, text=prompt, add_special_tokens=False)
    features = [ours.process(image, "h") for image in images]
    assert _ids(ours, tokenizer, prompt, features) == reference["input_ids"][0]


def test_idefics3_tiling_and_placeholder(processors):
    ours = processors["idefics3"][0]
    assert (ours.image_seq_len, ours.tile_size, ours.longest_edge, ours.image_token_id) == (16, 64, 128, IMAGE_TOKEN_ID)
    wide = ours.process(IMAGES["rgb_200x150"], "h")  # 128x96 -> 128x128: 2x2 tiles + global view
    assert wide.pixel_values.shape == (5, 3, 64, 64) and wide.num_image_tokens == 5 * 16
    assert wide.placeholder.startswith("<fake_token_around_image><row_1_col_1>" + IMAGE_TOKEN * 16)
    assert wide.placeholder.endswith("\n\n<fake_token_around_image><global-img>" + IMAGE_TOKEN * 16
                                     + "<fake_token_around_image>")
    strip = ours.process(IMAGES["rgb_400x9"], "h")  # 128 wide, 2 high -> 128x64: 1 row of 2 tiles
    assert strip.pixel_values.shape[0] == 3 and "<row_1_col_2>" in strip.placeholder
    assert "<row_2_col_1>" not in strip.placeholder


def test_llava_token_count(processors):
    ours = processors["llava"][0]
    features = ours.process(IMAGES["rgb_100x37"], "h")
    assert features.pixel_values.shape == (1, 3, 32, 32)
    assert features.num_image_tokens == 16 and features.placeholder == IMAGE_TOKEN * 16  # CLS dropped
    assert features.pixel_attention_mask is None


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_marker_count_mismatch_raises(processors, kind):
    ours = processors[kind][0]
    features = ours.process(IMAGES["rgb_64x64"], "h")
    with pytest.raises(ValueError, match="1 image marker"):
        ours.expand_prompt(f"one {IMAGE_TOKEN}", [features, features])
    with pytest.raises(ValueError, match="2 image marker"):
        ours.expand_prompt(f"{IMAGE_TOKEN}{IMAGE_TOKEN}", [features])
    assert ours.expand_prompt("no image", []) == "no image"


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_transformers5_nested_layout_reads_the_same(processors, tmp_path, kind):
    """transformers 5 saves the image settings nested in processor_config.json."""
    save_tiny_processor(kind, tmp_path, hub_layout=False)
    assert not (tmp_path / "preprocessor_config.json").exists()
    assert load_processor(tmp_path, HF_CONFIGS[kind]().to_dict()) == processors[kind][0]


def test_missing_processor_files_fall_back_to_the_model_config(processors, tmp_path):
    """Without processor_config.json the token counts come from config.json."""
    for kind in ("idefics3", "llava"):
        folder = tmp_path / kind
        save_tiny_processor(kind, folder)
        (folder / "processor_config.json").unlink()
        assert load_processor(folder, HF_CONFIGS[kind]().to_dict()) == processors[kind][0]


def test_text_only_model_has_no_processor(tmp_path):
    assert load_processor(tmp_path, {"model_type": "llama"}) is None
    assert load_processor(tmp_path, {}) is None
