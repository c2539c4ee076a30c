"""SmolVLM from llama.cpp's two files (a text GGUF and its mmproj GGUF) against the same model
from its Hugging Face folder: the same image embeddings, prompt ids and greedy answers; and one
clear error for each pair that cannot be a model."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hayate.config import EngineConfig
from hayate.kernels import native_kernels
from hayate.llm import LLM
from hayate.loading.loader import ModelLoadError, load_model
from hayate.multimodal.image import ImageLimits, decode_image
from hayate.sampling import SamplingParams
from gguf_files import QType, export_hf_model, projections_per_layer, tiny_model
from mmproj_files import make_smolvlm_files, mmproj_tensors, write_mmproj

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module", params=[QType.F32, QType.Q8_0], ids=["f32", "q8_0"])
def smolvlm(request, tmp_path_factory):
    """(folder, text GGUF, mmproj GGUF), the vision matrices stored as the param (the connector
    in F16 when quantized), the embeddings and norms in F32 as the converter stores them."""
    return make_smolvlm_files(tmp_path_factory.mktemp("smolvlm"), vision_qtype=request.param)


def image(width: int, height: int, seed: int):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), ImageLimits())


def hf_model(folder) -> torch.nn.Module:
    return transformers.Idefics3ForConditionalGeneration.from_pretrained(folder)


def ask(*images) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": "What is in this picture?"}]}]


def test_image_embeddings_and_processor_equal_the_folders(smolvlm):
    folder, text, mmproj = smolvlm
    reference = load_model(EngineConfig(model=str(folder)))
    ours = load_model(EngineConfig(model=str(text), mmproj=str(mmproj)))
    pixels, mask = torch.randn(3, 3, 64, 64), torch.ones(3, 64, 64, dtype=torch.bool)
    mask[0, 40:, 50:] = False
    with torch.inference_mode():
        expected, actual = (loaded.model.encode_image(pixels, mask) for loaded in (reference, ours))
    assert actual.shape == (3 * 16, 64)
    assert (actual - expected).abs().max().item() < 1e-5
    assert ours.processor == reference.processor
    assert ours.config.image_token_id == reference.config.image_token_id


def test_greedy_answer_with_an_image_equals_the_folders(smolvlm):
    folder, text, mmproj = smolvlm
    reference, ours = LLM(str(folder)), LLM(str(text), mmproj=str(mmproj), weights="fp32")
    messages = ask(image(100, 37, seed=1))
    assert ours.prepare_chat(messages).token_ids == reference.prepare_chat(messages).token_ids
    expected, actual = reference.chat(messages, GREEDY), ours.chat(messages, GREEDY)
    assert actual.token_ids == expected.token_ids
    for a, b in zip(actual.logprobs, expected.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-4


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_packed_text_model_beside_the_image_encoder(tmp_path):
    """A Q8_0 text GGUF keeps its packed kernels; the answer equals its fp32 twin's."""
    _, text, mmproj = make_smolvlm_files(tmp_path, text_qtype=QType.Q8_0)
    packed, reference = (LLM(str(text), mmproj=str(mmproj), weights=mode) for mode in ("auto", "fp32"))
    modules = [type(m).__name__ for m in packed.loaded.model.modules()]
    assert modules.count("PackedLinear") == projections_per_layer() * packed.model_config.num_hidden_layers + 1
    messages = ask(image(64, 90, seed=2))
    ours, theirs = packed.chat(messages, GREEDY), reference.chat(messages, GREEDY)
    assert ours.token_ids == theirs.token_ids
    for a, b in zip(ours.logprobs, theirs.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-3


def test_legacy_swapped_ffn_names_are_put_right(tmp_path):
    """Older converters wrote mlp.fc1 as ffn_down and fc2 as ffn_up; clip.cpp swaps them by shape."""
    folder, text, mmproj = make_smolvlm_files(tmp_path)
    model = hf_model(folder)
    swapped = {name.replace("ffn_up", "ffn_TMP").replace("ffn_down", "ffn_up").replace("ffn_TMP", "ffn_down"): value
               for name, value in mmproj_tensors(model, QType.F32).items()}
    legacy = write_mmproj(tmp_path / "legacy.gguf", model, swapped)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected, actual = (load_model(EngineConfig(model=str(text), mmproj=str(path))).model.encode_image(pixels)
                            for path in (mmproj, legacy))
    assert (actual - expected).abs().max().item() < 1e-5


# ---- errors: one line each, before anything is built

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_smolvlm_files(tmp_path_factory.mktemp("pair"))


def load_error(text, mmproj) -> str:
    with pytest.raises(ModelLoadError) as error:
        load_model(EngineConfig(model=str(text), mmproj=str(mmproj)))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unsupported_projector_type(pair, tmp_path):
    folder, text, _ = pair
    model = hf_model(folder)
    other = write_mmproj(tmp_path / "gemma3.gguf", model, mmproj_tensors(model, QType.F32),
                         **{"clip.projector_type": "gemma3"})
    assert "projector type 'gemma3', which hayate does not support" in load_error(text, other)


def test_text_model_without_an_image_token(pair, tmp_path):
    plain = export_hf_model(tmp_path / "plain.gguf", tiny_model("llama"), "llama")
    assert "has no <image> token in its vocabulary" in load_error(plain, pair[2])


def test_projector_for_another_text_model(pair, tmp_path):
    _, narrow_text, _ = make_smolvlm_files(tmp_path, text_hidden_size=32)
    assert "projects images to 64 values per token, but text.gguf embeds tokens in 32" in load_error(
        narrow_text, pair[2])


def test_missing_files_and_misplaced_mmproj(pair, tmp_path):
    folder, text, mmproj = pair
    assert "no such file" in load_error(text, tmp_path / "absent.gguf")
    assert "is not a multimodal projector (mmproj) file" in load_error(text, text)
    assert "is a Hugging Face folder" in load_error(folder, mmproj)
    with pytest.raises(ValueError, match="is an image encoder .mmproj., not a text model: give it as --mmproj"):
        load_model(EngineConfig(model=str(mmproj)))
    with pytest.raises(ValueError, match="mmproj needs model"):
        EngineConfig(mmproj=str(mmproj))


@pytest.mark.parametrize("keys, message", [
    ({"clip.vision.embedding_length": None}, "the metadata key 'clip.vision.embedding_length' is missing"),
    ({"clip.vision.block_count": 3}, "clip.vision.block_count is 3, but the file has tensors for 2 layers"),
    ({"clip.vision.image_mean": [0.5, 0.5]}, "clip.vision.image_mean must be 3 finite numbers"),
    ({"clip.vision.projector.scale_factor": 3}, "scale_factor 3 does not divide the 8 patches per side"),
    ({"clip.vision.preproc_image_size": 2 ** 30}, "clip.vision.preproc_image_size is 1073741824, more than"),
    ({"clip.vision.patch_size": 16}, "tensor v.patch_embd.weight has shape (32, 3, 8, 8)"),
])
def test_inconsistent_mmproj_is_refused(pair, tmp_path, keys, message):
    folder, text, _ = pair
    model = hf_model(folder)
    bad = write_mmproj(tmp_path / "bad.gguf", model, mmproj_tensors(model, QType.F32), **keys)
    assert message in load_error(text, bad)


def test_mmproj_reader_refuses_a_truncated_file(pair, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(pair[2].read_bytes()[:-100])
    assert "truncated or corrupt" in load_error(pair[1], truncated)
