"""The native GGUF-block kernels against their slow twins: gguf's dequantization and an
fp32 matmul with the dequantized weight."""
from __future__ import annotations

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
        kernels.gemv(torch.randn(1, 256), weight.data, 12)
