"""The native GGUF-block kernels against their slow twins: gguf's dequantization and an
fp32 matmul with the dequantized weight."""
from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hayate.kernels import native_kernels
from hayate.kernels import MAX_NATIVE_ROWS
from hayate.layers.linear import PackedLinear, share_workspace
from hayate.layers.norm import RMSNorm
from hayate.layers.quant import PackedWeight, QType
from hayate.layers.rotary import RotaryEmbedding, apply_rotary

NATIVE = [QType.Q4_0, QType.Q4_1, QType.Q8_0]


@pytest.fixture(scope="module")
def kernels():
    module = native_kernels()
    if module is None:
        pytest.skip("no C++ toolchain to build the native kernels")
    return module


def test_kernels_build_wherever_a_toolchain_exists():
    """A compile error must fail the suite, not quietly skip every native test (native_kernels()
    falls back to PyTorch, with a warning, where the kernels cannot be built)."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or ninja here")
    assert native_kernels() is not None, "the native kernels failed to build: see the warning above"


def packed(qtype: QType, rows: int = 80, cols: int = 256, seed: int = 0) -> PackedWeight:
    values = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    data = torch.from_numpy(gguf.quants.quantize(values, qtype).reshape(rows, -1).copy())
    return PackedWeight(data, int(qtype), (rows, cols))


@pytest.mark.parametrize("qtype", NATIVE)
def test_native_dequantize_is_bitwise_gguf(kernels, qtype):
    weight = packed(qtype)
    reference = gguf.quants.dequantize(weight.data.numpy(), qtype).reshape(weight.shape)
    assert torch.equal(kernels.dequantize(weight.data, int(qtype), weight.shape[1]), torch.from_numpy(reference))


@pytest.mark.parametrize("qtype", NATIVE)
@pytest.mark.parametrize("rows", [1, 2, 7, MAX_NATIVE_ROWS])
def test_gemv_matches_fp32_matmul(kernels, qtype, rows):
    weight = packed(qtype)
    x = torch.randn(rows, weight.shape[1])
    expected = x @ weight.dequantize().T
    actual = kernels.gemv(x, weight.data, int(qtype))
    # fp32 activations and accumulation: only the summation order differs.
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", NATIVE)
@pytest.mark.parametrize("tokens", [1, 4, MAX_NATIVE_ROWS + 1])  # native rows, and the prefill path
def test_packed_linear_matches_dequantized_linear(kernels, qtype, tokens):
    weight = packed(qtype)
    bias = torch.randn(weight.shape[0])
    x = torch.randn(tokens, weight.shape[1])
    expected = F.linear(x, weight.dequantize(), bias)
    assert torch.allclose(PackedLinear(weight, bias)(x), expected, rtol=1e-5, atol=1e-4)


def test_shared_dequantization_workspace_changes_nothing(kernels):
    """Prefill-sized inputs dequantize into one shared buffer, layer after layer."""
    first, second = PackedLinear(packed(QType.Q4_1, 96, 256, seed=1)), PackedLinear(packed(QType.Q8_0, 64, 96, seed=2))
    model = torch.nn.Sequential(first, second)
    x = torch.randn(MAX_NATIVE_ROWS + 3, 256)
    expected = model(x)
    share_workspace(model)
    assert first.workspace is second.workspace is not None
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)


def test_rows_of_a_batch_equal_rows_alone(kernels):
    """Each activation row's result does not depend on the others (batch invariance)."""
    weight = packed(QType.Q4_1)
    x = torch.randn(9, weight.shape[1])
    together = kernels.gemv(x, weight.data, int(QType.Q4_1))
    alone = torch.cat([kernels.gemv(x[i:i + 1], weight.data, int(QType.Q4_1)) for i in range(9)])
    assert torch.equal(together, alone)


def rearranged(kernels, weight: PackedWeight):
    if not hasattr(kernels, "InterleavedWeight"):
        pytest.skip("this CPU has no AVX-512 VNNI: the planned step reads GGUF blocks in place")
    return kernels.InterleavedWeight(weight.data, weight.ggml_type, weight.shape[1])


def interleaved(kernels, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    return rearranged(kernels, weight).apply(x)


def test_weights_rearranged_into_one_arena_equal_alone(kernels):
    """A model's weights share one arena (2 MB pages, no rounding per matrix): each still
    holds its own blocks and multiplies as it does alone."""
    weights = [packed(QType.Q4_1, 100, 256, seed=1), packed(QType.Q8_0, 48, 96, seed=2), packed(QType.Q4_0, 16, 64)]
    rearranged(kernels, weights[0])   # skips without VNNI
    together = kernels.InterleavedWeight.all([w.data for w in weights], [w.ggml_type for w in weights],
                                             [w.shape[1] for w in weights])
    for weight, shared in zip(weights, together):
        x = torch.randn(3, weight.shape[1])
        assert torch.equal(shared.gguf_blocks(), weight.data)
        assert torch.equal(shared.apply(x), rearranged(kernels, weight).apply(x))


@pytest.mark.parametrize("qtype", NATIVE)
def test_rearranged_weight_keeps_every_bit(kernels, qtype):
    """The planned step's arrangement holds the file's bytes (the last group of 16 rows
    padded, Q4_0 with its offsets -8 d written out): it gives them back exactly, and dequantizes bit for bit as gguf does."""
    weight = packed(qtype, rows=100)
    w = rearranged(kernels, weight)
    assert torch.equal(w.gguf_blocks(), weight.data)
    rows, blocks = 112, weight.shape[1] // 32   # 100 rows padded to 7 groups of 16
    assert w.nbytes() == rows * blocks * (34 if qtype == QType.Q8_0 else 20)   # Q4_0: + its offsets
    reference = gguf.quants.dequantize(weight.data.numpy(), qtype).reshape(weight.shape)
    assert torch.equal(w.dequantize(), torch.from_numpy(reference))
    into = torch.full((weight.shape[0] * weight.shape[1],), float("nan"))
    assert torch.equal(w.dequantize(into).view(weight.shape), torch.from_numpy(reference))


def test_interleaved_packed_linear_matches_its_blocks(kernels):
    """A packed layer that hands its weight to the plan keeps working for every row count,
    and holds one copy of it."""
    weight = packed(QType.Q4_1, rows=100)
    bias = torch.randn(100)
    layer, reference = PackedLinear(weight, bias), PackedLinear(weight, bias)
    layer.use_interleaved(rearranged(kernels, weight))
    assert layer.packed.numel() == 0 and layer.nbytes() >= weight.nbytes()
    assert torch.equal(layer.weight.data, weight.data)
    for tokens in (1, 5, MAX_NATIVE_ROWS + 1, 3 * MAX_NATIVE_ROWS + 5):   # prompt chunks too: 16 rows a pass
        x = torch.randn(tokens, weight.shape[1])
        assert torch.allclose(layer(x), reference(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", NATIVE)
@pytest.mark.parametrize("rows", [1, 2, 7, 9, MAX_NATIVE_ROWS, 2 * MAX_NATIVE_ROWS + 3])
def test_interleaved_gemv_is_as_exact_as_fp32(kernels, qtype, rows):
    """The planned step's kernel (activations as three byte planes, weights rearranged) is
    held to a float64 product with the dequantized weight, as closely as the fp32 kernel is;
    an output width that is not a multiple of 16, activations over six decades, a zero block."""
    weight = packed(qtype, rows=100)
    x = torch.randn(rows, weight.shape[1]) * torch.rand(rows, weight.shape[1]) ** 6 * 50
    x[0, 32:64] = 0
    exact = x.double() @ weight.dequantize().double().T
    fp32 = torch.cat([kernels.gemv(x[i:i + MAX_NATIVE_ROWS], weight.data, int(qtype))
                      for i in range(0, rows, MAX_NATIVE_ROWS)])
    fp32_error = (fp32.double() - exact).abs().max()
    error = (interleaved(kernels, x, weight).double() - exact).abs().max()
    assert error <= 4 * fp32_error + 1e-6, (error, fp32_error)


def test_interleaved_rows_of_a_batch_equal_rows_alone(kernels):
    weight = packed(QType.Q4_1)
    rows = 2 * MAX_NATIVE_ROWS + 3   # three passes over the weight
    x = torch.randn(rows, weight.shape[1])
    together = interleaved(kernels, x, weight)
    alone = torch.cat([interleaved(kernels, x[i:i + 1], weight) for i in range(rows)])
    assert torch.equal(together, alone)


def test_interleaved_gemv_lets_inf_and_nan_through(kernels):
    weight = packed(QType.Q8_0)
    x = torch.randn(2, weight.shape[1])
    x[0, 5], x[1, 40] = float("inf"), float("nan")
    assert not interleaved(kernels, x, weight).isfinite().any()


@pytest.mark.parametrize("rows", [1, 3, MAX_NATIVE_ROWS])
def test_rms_norm_matches_torch(kernels, rows):
    x, weight = torch.randn(rows, 576) * 3, torch.randn(576)
    expected = F.rms_norm(x, (576,), weight, 1e-5)
    assert torch.allclose(kernels.rms_norm(x, weight, 1e-5), expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(RMSNorm(576, 1e-5).requires_grad_(False)(x), F.rms_norm(x, (576,), None, 1e-5),
                          rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 2])
def test_rope_in_place_matches_torch(kernels, tokens):
    rotary = RotaryEmbedding(64, 128, 10000.0)
    tables = rotary.tables(torch.arange(40, 40 + tokens))
    q, k = torch.randn(tokens, 9, 64), torch.randn(tokens, 3, 64)
    cos, sin = tables
    expected_q = q * cos + torch.cat((-q[..., 32:], q[..., :32]), -1) * sin
    expected_k = k * cos + torch.cat((-k[..., 32:], k[..., :32]), -1) * sin
    native_q, native_k = apply_rotary(tables, q.clone(), k.clone())          # the native path
    strided_q, strided_k = apply_rotary(tables, q.transpose(0, 1).contiguous().transpose(0, 1),
                                        k.transpose(0, 1).contiguous().transpose(0, 1))  # torch's path
    for actual in (native_q, strided_q):
        assert torch.allclose(actual, expected_q, atol=1e-6)
    for actual in (native_k, strided_k):
        assert torch.allclose(actual, expected_k, atol=1e-6)


def test_bad_inputs_raise(kernels):
    weight = packed(QType.Q4_1)
    with pytest.raises(RuntimeError, match="weight bytes"):
        kernels.gemv(torch.randn(1, 128), weight.data, int(QType.Q4_1))
    with pytest.raises(RuntimeError, match="unsupported"):
        kernels.gemv(torch.randn(1, 256), weight.data, int(QType.Q2_K))   # no native kernel


@pytest.mark.parametrize("vocab", [1, 15, 16, 49152, 49157])
def test_argmax_rows_is_numpys(kernels, vocab):
    """The greedy step's argmax: numpy's index (the first of ties, a NaN counting as greatest)."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator)
    logits[1] = float("-inf")                       # every value -inf: index 0
    logits[2, vocab // 3:] = logits[2].max() + 1    # ties: the first
    logits[3, vocab - 1] = float("nan")             # NaN wins
    logits[4, vocab // 2] = float("inf")
    logits[5, (vocab - 1) // 2] = logits[5, vocab - 1] = float("nan")
    assert kernels.argmax_rows(logits) == logits.numpy().argmax(axis=1).tolist()
    assert kernels.argmax_rows(logits[:, : max(1, vocab - 1)]) == logits[:, : max(1, vocab - 1)].numpy().argmax(axis=1).tolist()
