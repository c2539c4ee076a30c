"""The vision-language models against Hugging Face transformers, on tiny random models: each
image's embeddings, then the logits of prompts that hold images, prefilled in chunks over a
paged KV cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hayate.engine.kv_cache import KVCache
from hayate.layers.attention import AttentionMetadata
from hayate.loading.safetensors import SafetensorsFolder
from hayate.models.config import ModelConfig
from hayate.models.registry import build_model
from tiny_vlms import IMAGE_TOKEN_ID, tiny_idefics3_config, tiny_llava_config

REFERENCES = {
    "idefics3": (tiny_idefics3_config, transformers.Idefics3ForConditionalGeneration),
    "llava": (tiny_llava_config, transformers.LlavaForConditionalGeneration),
}
TOKENS_PER_TILE = 16   # both tiny configs: 16 image tokens per tile (LLaVA: per image)
BLOCK_SIZE = 16


def make_reference(kind: str, folder: Path, **overrides) -> torch.nn.Module:
    make_config, model_class = REFERENCES[kind]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(folder)
    return model


def load_hayate(folder: Path) -> torch.nn.Module:
    source = SafetensorsFolder(folder)
    model = build_model(ModelConfig.from_hf(source.config), max_positions=256)
    model.load_weights(source.tensors())
    return model.eval()


def idefics3_tiles(num_tiles: int, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[tiles, 3, 64, 64] pixels and their [tiles, 64, 64] mask; `padded`: the first tile's
    bottom rows and right columns are padding (zeros, masked), as the processor pads."""
    pixels = torch.randn(num_tiles, 3, 64, 64)
    mask = torch.ones(num_tiles, 64, 64, dtype=torch.bool)
    if padded:
        mask[0, 44:, :] = False
        mask[0, :, 37:] = False
        pixels[0][:, ~mask[0]] = 0.0
    return pixels, mask


def prompt_with_images(tokens_per_image: list[int]) -> torch.Tensor:
    """Text, then each image's run of image tokens between text."""
    ids = [256, 72, 105, 261]
    for count in tokens_per_image:
        ids += [IMAGE_TOKEN_ID] * count + [261, 10, 33, 34]
    return torch.tensor(ids + [65, 66, 67])


def hayate_prompt_logits(model, ids: torch.Tensor, images: list[tuple]) -> torch.Tensor:
    """Embed the prompt with each image's rows in place, prefill it 11 tokens at a time over
    scattered cache blocks, and return the logits of every position."""
    embeds = model.embed_input_ids(ids)
    embeds[ids == model.image_token_id] = torch.cat([model.encode_image(*image) for image in images])
    num_blocks = -(-len(ids) // BLOCK_SIZE) + 2
    cache = KVCache(model.config, num_blocks, BLOCK_SIZE)
    cache.bind(model)
    block_table = list(reversed(range(num_blocks)))
    logits = []
    for start in range(0, len(ids), 11):
        chunk = slice(start, min(start + 11, len(ids)))
        meta = AttentionMetadata.build([block_table], [start], [chunk.stop - start], BLOCK_SIZE)
        hidden = model(ids[chunk], meta.positions(), meta, inputs_embeds=embeds[chunk])
        logits.append(model.compute_logits(hidden))
    return torch.cat(logits)


@pytest.mark.parametrize("padded", [False, True])
def test_idefics3_image_embeddings_match(padded, tmp_path):
    reference = make_reference("idefics3", tmp_path)
    model = load_hayate(tmp_path)
    pixels, mask = idefics3_tiles(5, padded)
    with torch.inference_mode():
        expected = reference.get_image_features(pixel_values=pixels[None], pixel_attention_mask=mask[None])
        actual = model.encode_image(pixels, mask)
    assert actual.shape == (5 * TOKENS_PER_TILE, 64)
    assert (actual - expected.pooler_output[0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("layers, strategy", [(-2, "default"), ([-3, -1], "full"), (-1, "default")])
def test_llava_image_embeddings_match(layers, strategy, tmp_path):
    reference = make_reference("llava", tmp_path, vision_feature_layer=layers,
                               vision_feature_select_strategy=strategy)
    model = load_hayate(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        expected = reference.get_image_features(pixel_values=pixels).pooler_output[0]
        actual = model.encode_image(pixels, None)
    assert actual.shape == (TOKENS_PER_TILE + (strategy == "full"), 64)
    assert (actual - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("tiles_per_image", [[5], [5, 2]])
def test_idefics3_logits_match(tiles_per_image, tmp_path):
    reference = make_reference("idefics3", tmp_path)
    model = load_hayate(tmp_path)
    images = [idefics3_tiles(tiles, padded=index == 1) for index, tiles in enumerate(tiles_per_image)]
    ids = prompt_with_images([tiles * TOKENS_PER_TILE for tiles in tiles_per_image])
    with torch.inference_mode():
        expected = reference(input_ids=ids[None], pixel_values=torch.cat([p for p, _ in images])[None],
                             pixel_attention_mask=torch.cat([m for _, m in images])[None]).logits[0]
        actual = hayate_prompt_logits(model, ids, images)
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("num_images", [1, 2])
def test_llava_logits_match(num_images, tmp_path):
    reference = make_reference("llava", tmp_path)
    model = load_hayate(tmp_path)
    pixels = torch.randn(num_images, 3, 32, 32)
    ids = prompt_with_images([TOKENS_PER_TILE] * num_images)
    with torch.inference_mode():
        expected = reference(input_ids=ids[None], pixel_values=pixels).logits[0]
        actual = hayate_prompt_logits(model, ids, [(image[None], None) for image in pixels])
    assert (actual - expected).abs().max().item() < 1e-4


# What transformers 5's save_pretrained writes -> the hub's llava-1.5 layout, or the newer one.
LLAVA_LAYOUTS = {
    "hub": [("vision_tower.", "vision_tower.vision_model.")],
    "nested": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")],
}


@pytest.mark.parametrize("layout", sorted(LLAVA_LAYOUTS))
def test_llava_loads_other_checkpoint_layouts(layout, tmp_path):
    reference = make_reference("llava", tmp_path)
    weights_file = tmp_path / "model.safetensors"
    renamed = {}
    for name, tensor in load_file(weights_file).items():
        for old, new in LLAVA_LAYOUTS[layout]:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = tensor
    assert set(renamed) != set(load_file(weights_file))
    save_file(renamed, weights_file)
    model = load_hayate(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    ids = prompt_with_images([TOKENS_PER_TILE])
    with torch.inference_mode():
        expected = reference(input_ids=ids[None], pixel_values=pixels).logits[0]
        actual = hayate_prompt_logits(model, ids, [(pixels, None)])
    assert (actual - expected).abs().max().item() < 1e-4


def test_partial_text_config_takes_transformers_defaults():
    """llava-1.5's config.json names only a few text settings; the rest are Llama's defaults."""
    hf = {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
          "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5,
                          "max_position_embeddings": 4096},
          "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "num_attention_heads": 16}}
    config = ModelConfig.from_hf(hf)
    text = transformers.LlavaConfig.from_dict(hf).text_config
    assert (config.model_type, config.text_model_type, config.image_token_id) == ("llava", "llama", 32000)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(config, field) == getattr(text, field), field
    assert config.rope_theta == text.rope_parameters["rope_theta"]
    assert config.hf_config == hf
