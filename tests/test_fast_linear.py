"""The fast int4 / bf16 linear layers against their slow twin: the dequantized fp32 layer."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hayate.layers.fast_linear import BF16Linear, Int4Linear, convert_to_fast, cuda_nibbles, int4_fits, unpack_q4
from hayate.layers.linear import PackedLinear
from hayate.layers.quant import PackedWeight, QType, dequantize


def packed(qtype: QType, rows: int = 96, cols: int = 128, seed: int = 0) -> PackedWeight:
    values = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    data = torch.from_numpy(gguf.quants.quantize(values, qtype).reshape(rows, -1).copy())
    return PackedWeight(data, int(qtype), (rows, cols))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1])
def test_unpack_q4_is_exact(qtype):
    weight = packed(qtype)
    q, scale, zero = unpack_q4(weight)
    rebuilt = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    # Q4_1's zero folds 8 * d into m: one fp32 rounding away from gguf's d * q + m.
    assert torch.allclose(rebuilt, weight.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1])
@pytest.mark.parametrize("tokens", [1, 5])
def test_int4_linear_matches_dequantized_within_bf16(qtype, tokens):
    weight = packed(qtype)
    bias = torch.randn(weight.shape[0])
    x = torch.randn(tokens, weight.shape[1])
    expected = F.linear(x, weight.dequantize(), bias)
    actual = Int4Linear(weight, bias)(x)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    # bf16 activations, scales and outputs: about 2^-8 relative to the output's scale.
    assert (actual - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_bf16_linear_matches_fp32_within_bf16():
    weight, x = torch.randn(64, 128), torch.randn(3, 128)
    assert (BF16Linear(weight)(x) - x @ weight.T).abs().max() <= 2e-2 * (x @ weight.T).abs().max()


def test_convert_to_fast_swaps_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), PackedLinear(packed(QType.Q4_1, 48, 32)),
                                PackedLinear(packed(QType.Q8_0, 16, 64)))
    convert_to_fast(model)
    assert [type(m) for m in model] == [BF16Linear, Int4Linear, BF16Linear]
    q8 = packed(QType.Q8_0, 16, 64)
    assert torch.equal(model[2].weight, dequantize(q8.data, q8.ggml_type, q8.shape).to(torch.bfloat16))


def test_cuda_nibbles_put_even_columns_high():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]], dtype=torch.int32)
    assert cuda_nibbles(q).tolist() == [[0x12, 0xF0], [0x78, 0x3C]]
    assert cuda_nibbles(q).dtype == torch.uint8


def test_which_weights_each_device_packs_as_int4():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert int4_fits((20, 64), cpu) and not int4_fits((20, 48), cpu)
    assert int4_fits((24, 64), cuda) and int4_fits((24, 96), cuda)   # tinygemm's tiles of 32
    assert not int4_fits((20, 64), cuda)                               # rows in eights
    assert not int4_fits((24, 64), torch.device("meta"))


def test_int4_linear_answers_in_the_input_dtype():
    layer = Int4Linear(packed(QType.Q4_1), torch.randn(96))
    x = torch.randn(3, 128)
    full, half = layer(x), layer(x.to(torch.bfloat16))
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), full, rtol=0, atol=2e-2 * full.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1])
def test_int4_linear_on_cuda_matches_the_cpu_kernel(qtype):
    weight, x = packed(qtype), torch.randn(5, 128, dtype=torch.bfloat16)
    expected = Int4Linear(weight)(x).float()
    actual = Int4Linear(weight, device="cuda")(x.cuda()).float().cpu()
    assert (actual - expected).abs().max() <= 2e-2 * expected.abs().max()
