"""llama.cpp's multimodal projector files (`convert_hf_to_gguf.py --mmproj`): a vision model's
image encoder in a GGUF of its own, beside the text model's GGUF. SmolVLM (Idefics3) for now.

The converter (SmolVLMModel, on MmprojModel) writes the Hugging Face checkpoint's vision tower
and connector under gguf's MODEL_ARCH.MMPROJ names (tensor_mapping.py), unpermuted (the tower
has no RoPE), the patch-embedding conv in torch's [out, in, kh, kw] order (GGUF lists dimensions
innermost first; clip.cpp runs ggml_conv_2d on it as stored), the embeddings in F32 and the other
matrices in the file's type (F16, Q8_0, ...). Every weight is dequantized to fp32 here.

Its keys give the tower's sizes, the connector's scale factor and the image processor's mean,
std and first-resize edge (clip.vision.preproc_image_size: the folder's size["longest_edge"]).
Images are then prepared as transformers' Idefics3 processor does, as for a Hugging Face
folder: llama.cpp's mtmd (mtmd_image_preprocessor_idefics3) resizes once, straight onto the
tile grid, where transformers resizes the longest edge first, then to whole tiles.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from hayate.layers.quant import dequantize
from hayate.loading.gguf import check_tensor_types, mapped_tensor, open_reader
from hayate.loading.gguf_checks import GGUFError, Metadata, check_shape, describe, is_number
from hayate.multimodal.idefics3 import MAX_IMAGE_SIZE
from hayate.multimodal.processor import IMAGE_MARKER

SUPPORTED_PROJECTORS = ("idefics3",)
DEFAULT_MEAN_STD = [0.5, 0.5, 0.5]   # SmolVLM's preprocessor_config.json

# GGUF tensor name -> Hugging Face name (gguf's MODEL_ARCH.MMPROJ map); "{i}" is the layer index.
_GLOBAL_TENSORS = {
    "v.patch_embd": "model.vision_model.embeddings.patch_embedding",
    "v.position_embd": "model.vision_model.embeddings.position_embedding",
    "v.post_ln": "model.vision_model.post_layernorm",
    "mm.model.fc": "model.connector.modality_projection.proj",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_LAYER_NAME = re.compile(r"v\.blk\.(0|[1-9]\d{0,8})\.(\w+)\.(weight|bias)")
_CLIP = "clip.vision"   # the key prefix of the vision settings


class MmprojFile:
    """One mmproj GGUF: its checked settings (as a config.json's vision_config, the connector's
    scale factor and the image processor's settings) and its weights under Hugging Face names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader, self.metadata = open_reader(self.path)
        name = self.path.name
        architecture = self.metadata.get("general.architecture")
        if architecture != "clip":
            raise GGUFError(f"{name} is not a multimodal projector (mmproj) file: its architecture is "
                            f"{describe(architecture)}, not 'clip'")
        projector = self.metadata.get(f"{_CLIP}.projector_type", self.metadata.get("clip.projector_type"))
        if projector not in SUPPORTED_PROJECTORS:
            raise GGUFError(f"{name} has projector type {describe(projector)}, which hayate does not support "
                            f"(supported: {', '.join(SUPPORTED_PROJECTORS)})")
        self._by_name = {tensor.name: tensor for tensor in self.reader.tensors}
        check_tensor_types(self.reader.tensors, self.path)
        meta = Metadata(self.metadata, _CLIP, name)
        self.vision_config, self.scale_factor = _vision_settings(meta)
        self.projection_dim = _check_tensors(meta, self._by_name, self.vision_config, self.scale_factor)
        self.longest_edge = meta.integer(meta.key("preproc_image_size"), maximum=MAX_IMAGE_SIZE)
        self.image_mean, self.image_std = (_triple(meta, meta.key(key)) for key in ("image_mean", "image_std"))
        self._hf_names = {t.name: _hf_name(t.name, self._by_name, self.vision_config) for t in self.reader.tensors}

    def __len__(self) -> int:
        return len(self._hf_names)

    def preprocessor_config(self) -> dict[str, Any]:
        """The image processor's settings, as a preprocessor_config.json says them (a key the
        file lacks is left out, so the processor takes SmolVLM's default)."""
        settings = {"max_image_size": {"longest_edge": self.vision_config["image_size"]},
                    "image_mean": self.image_mean, "image_std": self.image_std}
        if self.longest_edge is not None:
            settings["size"] = {"longest_edge": self.longest_edge}
        return settings

    def idefics3_config(self, text: dict[str, Any], image_token_id: int, text_name: str) -> dict[str, Any]:
        """The config.json of the Idefics3 model that a text GGUF's settings (`text`, from
        GGUFModelFile.hf_config) and this projector make together; GGUFError where they do not fit."""
        if text["model_type"] != "llama":
            raise GGUFError(f"{self.path.name} is SmolVLM's image encoder, whose text model is a llama, "
                            f"but {text_name} is a {text['model_type']} model")
        if self.projection_dim != text["hidden_size"]:
            raise GGUFError(f"{self.path.name} projects images to {self.projection_dim} values per token, but "
                            f"{text_name} embeds tokens in {text['hidden_size']}: the two files are not one model")
        return {**text, "model_type": "idefics3", "text_model_type": "llama", "image_token_id": image_token_id,
                "scale_factor": self.scale_factor, "vision_config": dict(self.vision_config)}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, fp32 weight) pairs."""
        for tensor in self.reader.tensors:
            shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))  # torch order
            yield self._hf_names[tensor.name], dequantize(mapped_tensor(tensor.data), int(tensor.tensor_type), shape)

    def dequantized_nbytes(self) -> int:
        """Bytes all weights take once dequantized to fp32."""
        return sum(4 * int(tensor.n_elements) for tensor in self.reader.tensors)


def image_token_id(metadata: dict[str, Any]) -> int | None:
    """The id of SmolVLM's image token in a text GGUF's vocabulary (None: it has none)."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    return tokens.index(IMAGE_MARKER) if IMAGE_MARKER in tokens else None


def idefics3_text_weights(weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """A text GGUF's weights (Llama names, `model.layers.*`) under the names of an Idefics3
    model's text part (`model.text_model.layers.*`); the head keeps its name."""
    for name, value in weights:
        yield (name if name.startswith("lm_head.") else "model.text_model." + name.removeprefix("model.")), value


def _vision_settings(meta: Metadata) -> tuple[dict[str, Any], int]:
    """(vision_config as transformers names it, scale factor), each key checked."""
    hidden, heads = (meta.integer(meta.key(key), required=True)
                     for key in ("embedding_length", "attention.head_count"))
    if hidden % heads:
        raise meta.fail(f"{meta.key('attention.head_count')} {heads} does not divide "
                        f"{meta.key('embedding_length')} {hidden}")
    image_size, patch_size = (meta.integer(meta.key(key), required=True) for key in ("image_size", "patch_size"))
    side = image_size // patch_size
    if image_size % patch_size or side == 0:
        raise meta.fail(f"{meta.key('image_size')} {image_size} is not a whole number of "
                        f"{meta.key('patch_size')} {patch_size} patches")
    scale_factor = meta.integer(meta.key("projector.scale_factor"), default=2)
    if side % scale_factor:
        raise meta.fail(f"{meta.key('projector.scale_factor')} {scale_factor} does not divide the "
                        f"{side} patches per side")
    config = {"hidden_size": hidden, "num_attention_heads": heads, "image_size": image_size,
              "patch_size": patch_size, "num_channels": 3,
              "intermediate_size": meta.integer(meta.key("feed_forward_length"), required=True),
              "num_hidden_layers": meta.integer(meta.key("block_count"), required=True),
              "layer_norm_eps": meta.number(meta.key("attention.layer_norm_epsilon"), 1e-6),
              # clip.use_gelu: ggml_gelu, the tanh approximation SigLIP was trained with
              "hidden_act": "gelu_pytorch_tanh"}
    return config, scale_factor


def _triple(meta: Metadata, key: str) -> list[float]:
    value = meta.get(key, DEFAULT_MEAN_STD)
    if not (isinstance(value, list) and len(value) == 3 and all(is_number(v) and math.isfinite(v) for v in value)):
        raise meta.fail(f"{key} must be 3 finite numbers (one per colour), got {describe(value)}")
    if key.endswith("std") and not all(v > 0 for v in value):
        raise meta.fail(f"{key} must be positive, got {value}")
    return [float(v) for v in value]


def _ffn_swapped(tensors: dict[str, Any], layer: int, vision: dict[str, Any]) -> bool:
    """Whether a layer's ffn_up and ffn_down hold each other's weights: older converters named
    them the wrong way round, and clip.cpp swaps them back by shape, as done here."""
    down = tensors.get(f"v.blk.{layer}.ffn_down.weight")
    hidden, ffn = vision["hidden_size"], vision["intermediate_size"]
    return down is not None and hidden != ffn and int(down.shape[0]) == hidden   # GGUF order: [in, out]


def _layer_shapes(vision: dict[str, Any], swapped: bool) -> dict[str, tuple[int, ...]]:
    """Torch-order shape of each weight and bias of one encoder layer, by GGUF name part."""
    hidden, ffn = vision["hidden_size"], vision["intermediate_size"]
    up, down = ((hidden, ffn), (ffn, hidden)) if swapped else ((ffn, hidden), (hidden, ffn))
    weights = {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden),
               "attn_out": (hidden, hidden), "ln1": (hidden,), "ln2": (hidden,), "ffn_up": up, "ffn_down": down}
    return {f"{part}.{kind}": shape if kind == "weight" else shape[:1]   # a bias per output
            for part, shape in weights.items() for kind in ("weight", "bias")}


def _check_tensors(meta: Metadata, tensors: dict[str, Any], vision: dict[str, Any], scale_factor: int) -> int:
    """Every tensor the tower loads has the shape the keys imply, none is missing or extra;
    returns the text embedding size the connector projects to."""
    hidden, patch = vision["hidden_size"], vision["patch_size"]
    projector = tensors.get("mm.model.fc.weight")
    rows = int(projector.shape[-1]) if projector is not None and len(projector.shape) == 2 else 0
    projection_dim = meta.integer(meta.key("projection_dim"), default=rows or None, required=not rows)
    keys = f"{meta.key('embedding_length')}={hidden}"
    expected = {"v.patch_embd.weight": (hidden, vision["num_channels"], patch, patch), "v.patch_embd.bias": (hidden,),
                "v.position_embd.weight": ((vision["image_size"] // patch) ** 2, hidden),
                "v.post_ln.weight": (hidden,), "v.post_ln.bias": (hidden,),
                "mm.model.fc.weight": (projection_dim, hidden * scale_factor ** 2)}
    layers = vision["num_hidden_layers"]
    found = {int(match[1]) for name in tensors if (match := _LAYER_NAME.fullmatch(name))}
    if found != set(range(layers)):
        what = f"{len(found)} layers, numbered up to {max(found)}" if found else "no layers"
        raise meta.fail(f"{meta.key('block_count')} is {layers}, but the file has tensors for {what}")
    for layer in range(layers):
        for part, shape in _layer_shapes(vision, _ffn_swapped(tensors, layer, vision)).items():
            expected[f"v.blk.{layer}.{part}"] = shape
    for name, shape in expected.items():
        check_shape(meta, tensors, name, shape, keys)
    extra = next((name for name in tensors if name not in expected), None)
    if extra is not None:
        raise meta.fail(f"the tensor {extra} has no place in an idefics3 projector")
    return projection_dim


def _hf_name(gguf_name: str, tensors: dict[str, Any], vision: dict[str, Any]) -> str:
    """A checked tensor's Hugging Face name (legacy swapped ffn_up / ffn_down put right)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    match = _LAYER_NAME.fullmatch(gguf_name)
    layer, part = int(match[1]), match[2]
    if part in ("ffn_up", "ffn_down") and _ffn_swapped(tensors, layer, vision):
        part = "ffn_down" if part == "ffn_up" else "ffn_up"
    return f"model.vision_model.encoder.layers.{layer}.{_LAYER_TENSORS[part]}.{suffix}"
