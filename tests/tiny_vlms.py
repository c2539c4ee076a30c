"""Tiny random vision-language configs (Idefics3 / SmolVLM-shaped and LLaVA-1.5-shaped), made
in the test without any download. The byte tokenizer of tiny_models gains the image tokens."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from tiny_models import BYTE_VOCAB, SPECIAL_TOKENS, VOCAB_SIZE, byte_tokenizer

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
MAX_TILES_PER_SIDE = 4
TILE_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, MAX_TILES_PER_SIDE + 1)
               for col in range(1, MAX_TILES_PER_SIDE + 1)]
# Token ids follow the byte alphabet and tiny_models' specials, in this order.
VLM_SPECIAL_TOKENS = [*SPECIAL_TOKENS, IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN, *TILE_TOKENS]
IMAGE_TOKEN_ID = BYTE_VOCAB + len(SPECIAL_TOKENS)

TEXT_CONFIG = dict(
    model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    initializer_range=0.1, bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB + 3)


def tiny_idefics3_config() -> transformers.Idefics3Config:
    """SmolVLM's shape, shrunk: 64-pixel tiles of 8-pixel patches, pixel shuffle by 2, so
    each tile (and the global view) becomes 64 / 8 = 8x8 patches -> 16 image tokens."""
    vision = dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=64, patch_size=8, initializer_range=0.1)
    return transformers.Idefics3Config(text_config=TEXT_CONFIG, vision_config=vision, scale_factor=2,
                                       image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=False,
                                       pad_token_id=BYTE_VOCAB + 1)


def tiny_llava_config() -> transformers.LlavaConfig:
    """LLaVA-1.5's shape, shrunk: a 32-pixel CLIP tower of 8-pixel patches (16 patches + CLS),
    features from the second-to-last layer without CLS -> 16 image tokens."""
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, projection_dim=32,
                  num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
                  initializer_range=0.1)
    return transformers.LlavaConfig(text_config=TEXT_CONFIG, vision_config=vision,
                                    image_token_index=IMAGE_TOKEN_ID, image_seq_length=16,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu")


# SmolVLM's end-of-turn token, after the image tokens (id BYTE_VOCAB + len(VLM_SPECIAL_TOKENS)).
END_OF_UTTERANCE = "<end_of_utterance>"
# The chat templates of SmolVLM-256M-Instruct and llava-1.5-7b-hf, verbatim: both write
# "<image>" for an image part (LLaVA puts a message's images first, each followed by "\n").
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

VLM_MODELS = {
    "idefics3": (tiny_idefics3_config, transformers.Idefics3ForConditionalGeneration),
    "llava": (tiny_llava_config, transformers.LlavaForConditionalGeneration),
}


def vlm_tokenizer(chat_template: str) -> transformers.PreTrainedTokenizerFast:
    """tiny_models' byte tokenizer with the image tokens (and SmolVLM's end of turn) as specials."""
    tokenizer = byte_tokenizer()
    extra = [*VLM_SPECIAL_TOKENS[len(SPECIAL_TOKENS):], END_OF_UTTERANCE]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_vlm(kind: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    """Create, save and return a tiny random transformers VLM ("idefics3" or "llava"), with the
    tokenizer, chat template and processor files a real hub folder of that kind carries."""
    make_config, model_class = VLM_MODELS[kind]
    torch.manual_seed(seed)
    model = model_class(make_config()).eval()
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_processor(kind, folder)
    return model


def save_tiny_processor(kind: str, folder: Path, hub_layout: bool = True, **image_options) -> None:
    """Save the transformers processor (tokenizer, chat template, image processor) for `kind`.

    image_options override the image processor's settings; for "llava", do_pad=True picks
    LlavaImageProcessor (square padding) instead of llava-1.5-hf's CLIPImageProcessor.
    hub_layout splits the files as hub folders have them (preprocessor_config.json beside a
    flat processor_config.json); otherwise transformers 5's nested processor_config.json stays."""
    if kind == "idefics3":
        options = {"size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64},
                   "do_image_splitting": True, **image_options}
        processor = transformers.Idefics3Processor(
            image_processor=transformers.Idefics3ImageProcessorPil(**options),
            tokenizer=vlm_tokenizer(SMOLVLM_CHAT_TEMPLATE), image_seq_len=16,
            chat_template=SMOLVLM_CHAT_TEMPLATE)
    elif kind == "llava":
        options = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, **image_options}
        image_class = (transformers.LlavaImageProcessorPil if options.get("do_pad")
                       else transformers.CLIPImageProcessorPil)
        processor = transformers.LlavaProcessor(
            image_processor=image_class(**options), tokenizer=vlm_tokenizer(LLAVA_CHAT_TEMPLATE),
            patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE)
    else:
        raise ValueError(f"unknown tiny VLM kind {kind!r}")
    processor.save_pretrained(folder)
    if hub_layout:
        _split_processor_config(Path(folder))


def _split_processor_config(folder: Path) -> None:
    """Move the nested image processor settings out to preprocessor_config.json."""
    path = folder / "processor_config.json"
    processor = json.loads(path.read_text())
    image = {**processor.pop("image_processor"), "processor_class": processor["processor_class"]}
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2, sort_keys=True) + "\n")
    path.write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")


def hf_processor(folder: Path) -> transformers.ProcessorMixin:
    """transformers' own processor for a folder: the reference the tests compare against."""
    return transformers.AutoProcessor.from_pretrained(folder)
