"""SmolVLM as llama.cpp's converter writes it (`convert_hf_to_gguf.py` and `--mmproj`), from a
tiny random transformers Idefics3: a llama text GGUF whose vocabulary holds the image tokens,
and a `clip` GGUF with the vision tower and connector (projector type idefics3)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

from gguf_files import QType, encode, llama_cpp_permute, write_model
from tiny_models import VOCAB_SIZE
from tiny_vlms import SMOLVLM_CHAT_TEMPLATE, save_tiny_processor, tiny_idefics3_config, vlm_tokenizer

NORMAL, CONTROL, UNUSED = 1, 3, 5   # llama.cpp's token types
PREPROCESSOR_LONGEST_EDGE = 128    # tiny_vlms' processor: size {"longest_edge": 128}


def make_smolvlm_files(folder: Path, text_qtype: QType = QType.F32, vision_qtype: QType = QType.Q8_0,
                       text_hidden_size: int | None = None, **mmproj_keys) -> tuple[Path, Path, Path]:
    """(Hugging Face folder, text GGUF, mmproj GGUF) of one tiny random SmolVLM. The folder's
    weights are the GGUF files' own (quantized ones decoded), so hayate must load the same model
    from either; `mmproj_keys` override the mmproj's keys (see write_mmproj)."""
    config = tiny_idefics3_config()
    if text_hidden_size is not None:
        text = config.text_config
        text.hidden_size, text.head_dim = text_hidden_size, text_hidden_size // text.num_attention_heads
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    stored = {**text_tensors(model, text_qtype), **mmproj_tensors(model, vision_qtype)}
    round_trip(model, {hf_name: qtype for _, qtype, hf_name in stored.values()})
    model.save_pretrained(folder / "hf", safe_serialization=True)
    save_tiny_processor("idefics3", folder / "hf")
    text = write_text_gguf(folder / "text.gguf", model, text_tensors(model, text_qtype))
    mmproj = write_mmproj(folder / "mmproj.gguf", model, mmproj_tensors(model, vision_qtype), **mmproj_keys)
    return folder / "hf", text, mmproj


def vision_qtype_of(gguf_name: str, array: np.ndarray, qtype: QType) -> QType:
    """The converter's choice: the embeddings (patch conv, positions) and 1-D tensors in F32,
    the other matrices in the file's type (here the connector in F16, to cover a second type)."""
    if array.ndim != 2 or not gguf_name.startswith(("v.blk.", "mm.")):
        return QType.F32
    return QType.F16 if gguf_name.startswith("mm.") and qtype != QType.F32 else qtype


def round_trip(model: torch.nn.Module, qtypes: dict[str, QType]) -> None:
    """Replace each weight that will be stored as qtypes[name] by its stored-then-decoded value."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            qtype = qtypes.get(name, QType.F32)
            values = parameter.numpy()
            if qtype == QType.F16:
                decoded = values.astype(np.float16).astype(np.float32)
            elif qtype != QType.F32:
                decoded = gguf.quants.dequantize(encode(values, qtype), qtype)
            else:
                continue
            parameter.copy_(torch.from_numpy(np.asarray(decoded, dtype=np.float32)).reshape(parameter.shape))


def mmproj_tensors(model: torch.nn.Module, qtype: QType) -> dict[str, tuple[np.ndarray, QType, str]]:
    """GGUF name -> (values, type, Hugging Face name) of the vision tower and connector."""
    vision = model.config.vision_config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision.num_hidden_layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        if hf_name.startswith(("model.vision_model.", "model.connector.")):
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            array = value.float().numpy()
            tensors[name] = (array, vision_qtype_of(name, array, qtype), hf_name)
    return tensors


def text_tensors(model: torch.nn.Module, qtype: QType) -> dict[str, tuple[np.ndarray, QType, str]]:
    """GGUF name -> (values, type, Hugging Face name) of the text model, q/k permuted for RoPE."""
    text = model.config.text_config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, text.num_hidden_layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        if not hf_name.startswith(("model.text_model.", "lm_head.")):
            continue
        array = value.float().numpy()
        if ".q_proj." in hf_name:
            array = llama_cpp_permute(array, text.num_attention_heads)
        if ".k_proj." in hf_name:
            array = llama_cpp_permute(array, text.num_key_value_heads)
        name = name_map.get_name(hf_name.replace("model.text_model.", "model."), try_suffixes=(".weight", ".bias"))
        tensors[name] = (array, qtype if array.ndim == 2 else QType.F32, hf_name)
    return tensors


def vocabulary() -> tuple[list[str], list[int]]:
    """tiny_vlms' tokenizer as the converter writes a byte-level BPE: added tokens as control
    tokens, the rows past the tokenizer's end as [PAD] tokens."""
    tokenizer = vlm_tokenizer(SMOLVLM_CHAT_TEMPLATE)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = set(tokenizer.get_added_vocab())
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(VOCAB_SIZE)]
    types = [CONTROL if token in added else NORMAL if index in by_id else UNUSED for index, token in enumerate(tokens)]
    return tokens, types


def write_text_gguf(path: Path, model: torch.nn.Module, tensors: dict, vocab=None) -> Path:
    text = model.config.text_config
    config = {**text.to_dict(), "rope_theta": text.rope_parameters["rope_theta"]}
    return write_model(path, "llama", config, {name: (encode(array, qtype), qtype)
                                               for name, (array, qtype, _) in tensors.items()},
                       vocabulary=vocab or vocabulary(), chat_template=SMOLVLM_CHAT_TEMPLATE)


def write_mmproj(path: Path, model: torch.nn.Module, tensors: dict, **overrides) -> Path:
    """An mmproj GGUF with the keys MmprojModel and SmolVLMModel write; `overrides`: key -> value
    written instead (None: left out)."""
    vision = model.config.vision_config
    keys = {"clip.projector_type": "idefics3", "clip.has_vision_encoder": True,
            "clip.vision.projection_dim": model.config.text_config.hidden_size,
            "clip.vision.image_size": vision.image_size, "clip.vision.patch_size": vision.patch_size,
            "clip.vision.embedding_length": vision.hidden_size,
            "clip.vision.feed_forward_length": vision.intermediate_size,
            "clip.vision.block_count": vision.num_hidden_layers,
            "clip.vision.attention.head_count": vision.num_attention_heads,
            "clip.vision.image_mean": [0.5, 0.5, 0.5], "clip.vision.image_std": [0.5, 0.5, 0.5],
            "clip.vision.attention.layer_norm_epsilon": vision.layer_norm_eps,
            "clip.vision.projector.scale_factor": model.config.scale_factor, "clip.use_gelu": True,
            "clip.vision.preproc_image_size": PREPROCESSOR_LONGEST_EDGE, **overrides}
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    for key, value in keys.items():
        if value is not None:
            _add_key(writer, key, value)
    for name, (array, qtype, _) in tensors.items():
        writer.add_tensor(name, encode(array, qtype), raw_dtype=qtype if qtype not in (QType.F32, QType.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_key(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_array(key, value)
