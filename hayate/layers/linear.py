"""PackedLinear: a linear layer that keeps its weight in GGUF form: fewer bytes to hold and,
through the native kernels, fewer bytes to read per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayate.kernels import kernels_for_rows, native_kernels
from hayate.layers.quant import NATIVE_TYPES, PackedWeight, QType, dequantize


class DequantWorkspace:
    """One fp32 scratch buffer that packed layers dequantize into, one after the other
    (prefill): allocated once and reused, so no chunk pays for fresh pages."""

    def __init__(self):
        self.buffer = torch.empty(0)

    def take(self, numel: int) -> torch.Tensor:
        if self.buffer.numel() < numel:
            self.buffer = torch.empty(numel)
        return self.buffer[:numel]


def share_workspace(model: nn.Module) -> None:
    """Give every packed layer of the model the same dequantization workspace."""
    workspace = DequantWorkspace()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.workspace = workspace


class PackedLinear(nn.Module):
    """A linear layer whose weight stays in its GGUF packed form: a decode step's few rows
    are multiplied by the blocks directly (native kernels, NATIVE_TYPES); otherwise the
    weight is dequantized for the forward."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.ggml_type = int(weight.ggml_type)
        # A buffer, so .to(device) moves it and state_dict() holds it.
        self.register_buffer("packed", weight.data.reshape(self.out_features, -1))  # [out, bytes per row]
        # The bias stays a parameter, as in nn.Linear, so loaders can find and fill it.
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)
        self.workspace: DequantWorkspace | None = None   # set by share_workspace()
        self.interleaved = None   # the weight rearranged for the planned step (interleave())

    @property
    def weight(self) -> PackedWeight:
        data = self.packed if self.interleaved is None else self.interleaved.gguf_blocks()
        return PackedWeight(data, self.ggml_type, (self.out_features, self.in_features))

    def use_interleaved(self, weight) -> None:
        """Keep the weight as `weight` (the native InterleavedWeight made from this layer's
        blocks: the same bytes, rearranged for the planned step's VNNI kernel, which shares
        it) instead of the file's blocks: one copy."""
        self.interleaved = weight
        self.packed = torch.empty(0, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in_features] -> [..., out_features]
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.interleaved is not None and x.dtype == torch.float32:
            # The VNNI kernel at any row count, 16 rows a pass: a prompt chunk of 512 rows runs
            # ~15% faster than dequantizing the weight for one fp32 matmul.
            out = self.interleaved.apply(rows)
        else:
            native = self.ggml_type in NATIVE_TYPES and x.device.type == "cpu"
            kernels = kernels_for_rows(x, rows.shape[0]) if native else None
            if kernels is None:
                # Prefill (many rows) and other types: dequantize once, then one matmul.
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return F.linear(x, self.dequantized(native_kernels() if native else None).to(x.dtype), bias)
            out = kernels.gemv(rows, self.packed, self.ggml_type)
        if self.bias is not None:
            out += self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self, kernels=None) -> torch.Tensor:
        """The weight in fp32 [out, in]: the same values either way, the native one faster."""
        into = None if self.workspace is None else self.workspace.take(self.out_features * self.in_features)
        if self.interleaved is not None:
            return self.interleaved.dequantize(into).view(self.out_features, self.in_features)
        if kernels is not None:
            weight = kernels.dequantize(self.packed, self.ggml_type, self.in_features, into)
            return weight.view(self.out_features, self.in_features)
        return dequantize(self.packed, self.ggml_type, (self.out_features, self.in_features))

    def nbytes(self) -> int:
        """Bytes the weight holds in memory, in whichever arrangement."""
        return self.packed.numel() if self.interleaved is None else self.interleaved.nbytes()

    def extra_repr(self) -> str:
        type_name = QType(self.ggml_type).name
        return f"in_features={self.in_features}, out_features={self.out_features}, type={type_name}"


def packed_linears(model: nn.Module) -> list[PackedLinear]:
    return [module for module in model.modules() if isinstance(module, PackedLinear)]


# Source bytes rearranged per native call: after each, `after_chunk` may drop the pages read.
REARRANGE_CHUNK_BYTES = 256 * 2**20


def rearrange_for_vnni(linears: list[PackedLinear], after_chunk=None) -> bool:
    """Each natively read packed layer's weight rearranged once for the VNNI kernel (where the
    CPU has AVX-512 VNNI), a chunk of layers per arena: the plan's weights, and an unplanned
    model's (a vision model's text layers), whose few-row steps then multiply as fast as the
    plan's. Whether any layer was rearranged."""
    kernels = native_kernels()
    fresh = [linear for linear in linears if linear.interleaved is None and linear.ggml_type in NATIVE_TYPES
             and linear.packed.device.type == "cpu"]
    if kernels is None or not hasattr(kernels, "InterleavedWeight") or not fresh:
        return False
    chunk, chunk_bytes = [], 0
    for index, linear in enumerate(fresh):
        chunk.append(linear)
        chunk_bytes += linear.packed.numel()
        if chunk_bytes >= REARRANGE_CHUNK_BYTES or index == len(fresh) - 1:
            weights = kernels.InterleavedWeight.all([m.packed for m in chunk], [m.ggml_type for m in chunk],
                                                    [m.in_features for m in chunk])
            for layer, weight in zip(chunk, weights):
                layer.use_interleaved(weight)
            if after_chunk is not None:
                after_chunk()
            chunk, chunk_bytes = [], 0
    return True
