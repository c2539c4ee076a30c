"""The native kernels for Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 (and the older types beside them)
against gguf's dequantization, on random valid blocks: dequantization bit for bit; the fp32
block GEMV and the VNNI kernel within fp32 rounding of x @ dequantized.T; the rearranged
layout giving the file's bytes back."""
from __future__ import annotations

import gguf
import pytest
import torch

from hayate.kernels import MAX_NATIVE_ROWS, native_kernels
from hayate.layers.linear import NATIVE_TYPES, PackedLinear
from hayate.layers.quant import PackedWeight, QType
from kquant_blocks import NEW_TYPES, random_blocks

ALL_NATIVE = NEW_TYPES + [QType.Q4_0, QType.Q4_1, QType.Q8_0]
ROWS, COLS = 40, 512   # 40 rows: two full groups of 16 and a padded one; two K super-blocks


@pytest.fixture(scope="module")
def kernels():
    module = native_kernels()
    if module is None:
        pytest.skip("no C++ toolchain to build the native kernels")
    return module


def reference(blocks: torch.Tensor, qtype: QType) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype).reshape(blocks.shape[0], -1))


def assert_close_to_exact(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Within fp32 rounding: error relative to |x| . |w| (the size of the terms summed)."""
    exact = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    assert ((out.double() - exact).abs() <= 1e-5 * scale + 1e-30).all()


def rearranged(kernels, blocks: torch.Tensor, qtype: QType):
    if not hasattr(kernels, "InterleavedWeight"):
        pytest.skip("this CPU has no AVX-512 VNNI: the planned step reads GGUF blocks in place")
    return kernels.InterleavedWeight(blocks, int(qtype), COLS)


def test_new_types_are_native():
    assert set(NEW_TYPES) <= NATIVE_TYPES


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_native_dequantize_is_bitwise_gguf(kernels, qtype):
    blocks = random_blocks(qtype, ROWS, COLS)
    assert torch.equal(kernels.dequantize(blocks, int(qtype), COLS), reference(blocks, qtype))


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, MAX_NATIVE_ROWS])
def test_block_gemv_is_exact_to_fp32(kernels, qtype, rows):
    blocks = random_blocks(qtype, ROWS, COLS, seed=rows)
    x = torch.randn(rows, COLS)
    assert_close_to_exact(kernels.gemv(x, blocks, int(qtype)), x, reference(blocks, qtype))


@pytest.mark.parametrize("qtype", ALL_NATIVE, ids=lambda t: t.name)
def test_rearranged_weight_keeps_every_bit(kernels, qtype):
    """The file's bytes come back exactly; dequantized bit for bit as gguf does; bytes held
    per 16 rows x 256 inputs as interleaved.h says."""
    blocks = random_blocks(qtype, ROWS, COLS)
    w = rearranged(kernels, blocks, qtype)
    assert torch.equal(w.gguf_blocks(), blocks)
    assert torch.equal(w.dequantize(), reference(blocks, qtype))
    per_unit = {QType.Q4_0: 2560, QType.Q4_1: 2560, QType.Q5_0: 2816, QType.Q5_1: 3072, QType.Q8_0: 4352,
                QType.Q4_K: 2368, QType.Q5_K: 2880, QType.Q6_K: 3360}[qtype]
    assert w.nbytes() == 3 * (COLS // 256) * per_unit


@pytest.mark.parametrize("qtype", ALL_NATIVE, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, MAX_NATIVE_ROWS, 40])
def test_interleaved_gemv_is_exact_to_fp32(kernels, qtype, rows):
    """Activations over six decades and a zero block, as the planned step meets them."""
    blocks = random_blocks(qtype, ROWS, COLS, seed=rows)
    x = torch.randn(rows, COLS) * torch.rand(rows, COLS) ** 6 * 50
    x[0, 32:64] = 0
    assert_close_to_exact(rearranged(kernels, blocks, qtype).apply(x), x, reference(blocks, qtype))


def test_one_arena_of_mixed_types_equals_each_alone(kernels):
    """A Q4_K_M model's weights share one arena; each keeps its bytes and its products."""
    weights = [(random_blocks(qtype, 24 + 8 * i, COLS, seed=i), qtype) for i, qtype in enumerate(ALL_NATIVE)]
    rearranged(kernels, *weights[0])   # skips without VNNI
    together = kernels.InterleavedWeight.all([b for b, _ in weights], [int(t) for _, t in weights], [COLS] * len(weights))
    x = torch.randn(2, COLS)
    for (blocks, qtype), shared in zip(weights, together):
        assert torch.equal(shared.gguf_blocks(), blocks)
        assert torch.equal(shared.apply(x), rearranged(kernels, blocks, qtype).apply(x))


@pytest.mark.parametrize("qtype", ALL_NATIVE, ids=lambda t: t.name)
def test_arena_filled_in_shared_chunks_keeps_every_bit(kernels, qtype):
    """The arrangement is filled by chunks of groups taken by whichever thread is free: many
    chunks (the last group partial), a one-row matrix and a wide one, each byte for byte."""
    rearranged(kernels, random_blocks(qtype, ROWS, COLS), qtype)   # skips without VNNI
    shapes = [(16 * 45 + 5, 768), (1, 256), (48, 256 * 5)]
    weights = [random_blocks(qtype, rows, cols, seed=7 + i) for i, (rows, cols) in enumerate(shapes)]
    together = kernels.InterleavedWeight.all(weights, [int(qtype)] * len(shapes), [cols for _, cols in shapes])
    for blocks, shared in zip(weights, together):
        assert torch.equal(shared.gguf_blocks(), blocks)
        assert torch.equal(shared.dequantize(), reference(blocks, qtype))


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_packed_linear_on_every_path(kernels, qtype):
    """Decode rows (block GEMV), prefill (native dequantization), and the rearranged weight
    the plan hands the layer (VNNI kernel at any row count)."""
    blocks = random_blocks(qtype, ROWS, COLS)
    weight, bias = reference(blocks, qtype), torch.randn(ROWS)
    layer = PackedLinear(PackedWeight(blocks, int(qtype), (ROWS, COLS)), bias)
    for tokens in (1, 5, MAX_NATIVE_ROWS + 1):
        x = torch.randn(tokens, COLS)
        assert_close_to_exact(layer(x) - bias, x, weight)
    layer.use_interleaved(rearranged(kernels, blocks, qtype))
    assert torch.equal(layer.weight.data, blocks)
    for tokens in (1, 2 * MAX_NATIVE_ROWS + 3):
        x = torch.randn(tokens, COLS)
        assert_close_to_exact(layer(x) - bias, x, weight)
