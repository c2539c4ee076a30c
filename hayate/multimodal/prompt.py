"""Chat messages, possibly holding images, to prompt token ids plus processed images.

Messages are dicts as chat templates take them. A part {"type": "image", "image": DecodedImage}
carries an image already decoded at the edge (CLI or server), and may say how closely to look at
it ("detail": "low" | "high" | "auto", OpenAI's; auto when absent); the template sees
it as {"type": "image"} and writes the model's marker, which the processor then expands into the
image's tokens."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hayate.loading.chat_template import ChatTemplate
from hayate.loading.tokenizer import Tokenizer
from hayate.multimodal.features import IMAGE_DETAILS, ImageDetail, PromptImages
from hayate.multimodal.image import DecodedImage, MediaError

if TYPE_CHECKING:
    from hayate.multimodal.processor import ImageProcessor


class PromptTooLong(ValueError):
    """The prompt's text is longer than any prompt that fits the context: refused before the
    tokenizer spends seconds on it."""


def check_prompt_chars(num_chars: int, max_chars: int | None) -> None:
    if max_chars is not None and num_chars > max_chars:
        raise PromptTooLong(f"the prompt is {num_chars} characters long, more than this model's context "
                            f"can hold (at most {max_chars} characters)")


@dataclass
class ChatPrompt:
    token_ids: list[int]
    images: PromptImages | None   # None for a text-only conversation


def image_parts(messages: list[dict]) -> list[dict]:
    """The image parts of a conversation, in order."""
    return [part for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if part.get("type") == "image"]


def encode_chat(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer,
                processor: ImageProcessor | None, add_generation_prompt: bool = True,
                max_chars: int | None = None, tools: list[dict] | None = None) -> ChatPrompt:
    """Raises MediaError (an image the model cannot take, an unknown detail), ChatTemplateError,
    and PromptTooLong when the messages' text, or the rendered prompt, is longer than max_chars.
    `tools` (OpenAI's shape) go to the template as transformers passes them."""
    check_prompt_chars(sum(map(_text_chars, messages)), max_chars)
    parts = image_parts(messages)
    if parts and processor is None:
        raise MediaError("this model does not accept images")
    begin = time.perf_counter()
    images: list[DecodedImage] = [part["image"] for part in parts]
    details = [check_detail(part.get("detail") or "auto") for part in parts]
    features = [processor.process(image.image, image.content_hash, detail) for image, detail in zip(images, details)]
    conversation = [_template_message(message, vision=processor is not None) for message in messages]
    text = template.render(conversation, add_generation_prompt=add_generation_prompt, tools=tools)
    check_prompt_chars(len(text), max_chars)
    if processor is not None:
        text = _expand(processor, text, features)
    # The template writes its own special tokens (BOS included).
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    if not features:
        return ChatPrompt(token_ids, None)
    return ChatPrompt(token_ids, PromptImages(features, preprocess_s=time.perf_counter() - begin,
                                              load_s=sum(image.load_seconds for image in images)))


def check_detail(detail: str) -> ImageDetail:
    if detail not in IMAGE_DETAILS:
        raise MediaError(f"an image's detail must be one of {', '.join(IMAGE_DETAILS)}; got {detail!r}")
    return detail   # type: ignore[return-value]


def _text_chars(message: dict) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content if isinstance(part.get("text"), str))
    return 0


def _expand(processor: ImageProcessor, text: str, features: list) -> str:
    try:
        return processor.expand_prompt(text, features)
    except ValueError as error:
        # e.g. the user typed the marker, or the template does not write one for images
        raise MediaError(f"the images do not match the prompt: {error}") from None


def _template_message(message: dict, vision: bool) -> dict:
    """Vision templates read content as a list of parts; text templates as one string."""
    content = message.get("content")
    if vision:
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            content = [{"type": "image"} if part.get("type") == "image" else part for part in content]
    elif isinstance(content, list):
        content = "\n".join(part.get("text", "") for part in content)
    return {**message, "content": content}
