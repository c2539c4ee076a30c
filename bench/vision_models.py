"""Random vision-language folders of real models' shapes, for the vision benchmarks (nothing is
downloaded; no VLM's weights ship on the package registry):

- smolvlm: SmolVLM-256M-Instruct (SigLIP-512 encoder of 12 layers at 768 wide, pixel shuffle by
  4, the 30-layer SmolLM2-135M text model) with SmolVLM's processor settings (longest edge 2048,
  512-pixel tiles plus a global view, 64 tokens each);
- llava: LLaVA-1.5's encoder and projector (CLIP ViT-L/14 at 336 pixels, 24 layers at 1024
  wide, 576 tokens, a two-layer GELU projector) in front of a Llama text model of LLaVA-1.5-7B's
  width but 2 of its 32 layers: the 7B text model in fp32 (27 GB) does not fit these machines,
  and an image's time to first token is the encoder's."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from image_samples import encode, noise  # noqa: E402  (the test suite's image and folder makers)
from tiny_vlms import (IMAGE_TOKEN_ID, LLAVA_CHAT_TEMPLATE, SMOLVLM_CHAT_TEMPLATE,  # noqa: E402
                       vlm_tokenizer)

SHAPES = ("smolvlm", "llava")
SMOLVLM_256M_TEXT = dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
SMOLVLM_256M_VISION = dict(model_type="idefics3_vision", hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12, image_size=512, patch_size=16)
LLAVA_15_TEXT = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=4096, rms_norm_eps=1e-5)
LLAVA_15_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                       projection_dim=768, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                       patch_size=14, hidden_act="quick_gelu")


def make_folder(shape: str, folder: Path) -> torch.nn.Module:
    """Save a random transformers model of `shape` with its processor; return the model."""
    torch.manual_seed(0)
    if shape == "smolvlm":
        config = transformers.Idefics3Config(text_config=SMOLVLM_256M_TEXT, vision_config=SMOLVLM_256M_VISION,
                                             scale_factor=4, image_token_id=IMAGE_TOKEN_ID)
        model = transformers.Idefics3ForConditionalGeneration(config).eval()
        image_processor = transformers.Idefics3ImageProcessorPil(
            size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, do_image_splitting=True)
        processor = transformers.Idefics3Processor(
            image_processor=image_processor, tokenizer=vlm_tokenizer(SMOLVLM_CHAT_TEMPLATE),
            image_seq_len=64, chat_template=SMOLVLM_CHAT_TEMPLATE)
    elif shape == "llava":
        config = transformers.LlavaConfig(text_config=LLAVA_15_TEXT, vision_config=LLAVA_15_VISION,
                                          image_token_index=IMAGE_TOKEN_ID, image_seq_length=576,
                                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                                          projector_hidden_act="gelu")
        model = transformers.LlavaForConditionalGeneration(config).eval()
        image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336},
                                                             crop_size={"height": 336, "width": 336})
        processor = transformers.LlavaProcessor(
            image_processor=image_processor, tokenizer=vlm_tokenizer(LLAVA_CHAT_TEMPLATE), patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE)
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model


def photo(size: tuple[int, int], seed: int) -> bytes:
    """A random photo-sized JPEG."""
    return encode(noise(size, seed=seed), "JPEG", quality=90)
