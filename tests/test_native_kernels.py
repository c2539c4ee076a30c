"""The native GGUF-block kernels against their slow twins: gguf's dequantization and an
fp32 matmul with the dequantized weight."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hayate.kernels import ggml_gemv
from hayate.layers.linear import MAX_NATIVE_ROWS, PackedLinear
from hayate.layers.quant import PackedWeight, QType

NATIVE = [QType.Q4_0, QType.Q4_1, QType.Q8_0]


@pytest.fixture(scope="module")
def kernels():
    module = ggml_gemv()
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


def test_rows_of_a_batch_equal_rows_alone(kernels):
    """Each activation row's result does not depend on the others (batch invariance)."""
    weight = packed(QType.Q4_1)
    x = torch.randn(9, weight.shape[1])
    together = kernels.gemv(x, weight.data, int(QType.Q4_1))
    alone = torch.cat([kernels.gemv(x[i:i + 1], weight.data, int(QType.Q4_1)) for i in range(9)])
    assert torch.equal(together, alone)


def test_bad_inputs_raise(kernels):
    weight = packed(QType.Q4_1)
    with pytest.raises(RuntimeError, match="weight bytes"):
        kernels.gemv(torch.randn(1, 128), weight.data, int(QType.Q4_1))
    with pytest.raises(RuntimeError, match="unsupported"):
        kernels.gemv(torch.randn(1, 256), weight.data, 12)
