"""Hardware profiles: what this machine can move and compute, measured by a short probe,
plus datasheet figures for common GPUs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import gguf
import torch

from hayate.kernels import native_kernels
from hayate.layers.quant import HALF_FIELDS, NATIVE_TYPES, QType


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    bandwidth: float       # bytes/s of memory read
    flops: float           # FLOP/s of the fastest exact matmul the engine runs
    # bytes/s at which the native kernel reads each GGUF type's blocks, streaming from memory
    packed_rates: dict[int, float] = field(default_factory=dict, compare=False)

    def floor_seconds(self, num_bytes: int, num_flops: int) -> float:
        """Roofline: a step can be no faster than its bytes or its FLOPs allow."""
        return max(num_bytes / self.bandwidth, num_flops / self.flops)

    def kernel_seconds(self, num_bytes: int, num_flops: int, ggml_type: int | None) -> float:
        """What the engine's kernel takes: packed blocks at the rate measured for their type."""
        rate = self.packed_rates.get(ggml_type) if ggml_type is not None else None
        if rate is None:
            return self.floor_seconds(num_bytes, num_flops)
        return max(num_bytes / rate, num_flops / self.flops)


def datasheet_profiles() -> dict[str, HardwareProfile]:
    """Dense bf16 tensor-core FLOP/s and HBM bandwidth from the vendors' datasheets."""
    return {
        "h200": HardwareProfile("NVIDIA H200", 4.8e12, 989e12),
        "h100": HardwareProfile("NVIDIA H100 SXM", 3.35e12, 989e12),
        "a100": HardwareProfile("NVIDIA A100 80GB SXM", 2.04e12, 312e12),
        "l4": HardwareProfile("NVIDIA L4", 0.30e12, 121e12),
        "rtx4090": HardwareProfile("NVIDIA RTX 4090", 1.01e12, 165e12),
    }


def probe_cpu(threads: int | None = None, buffer_mb: int = 256, repeats: int = 5, types=None) -> HardwareProfile:
    """Measure read bandwidth (summing a buffer far larger than the caches), the matmul rate
    (fp32, or the planned step's byte-plane kernel at 16 rows, which prefills short prompts,
    whichever is faster), and the native kernel's read rate for each GGUF type it takes, with
    the given thread count (every type, or those of `types`); best of `repeats` to skip warm-up
    noise."""
    if threads:
        torch.set_num_threads(threads)
    data = torch.ones(buffer_mb * 2**20 // 4)
    bandwidth = data.numel() * 4 / _best_time(lambda: data.sum(), repeats)
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    flops = 2 * 512 * 1024 * 1024 / _best_time(lambda: a @ b, repeats)
    kernels = native_kernels()
    if kernels is not None and hasattr(kernels, "InterleavedWeight"):
        q4_1 = QType.Q4_1
        weight = kernels.InterleavedWeight(_valid_blocks(q4_1, 1024 * 1024 // 32 * 20, 1024), int(q4_1), 1024)
        x = torch.randn(16, 1024)
        flops = max(flops, 2 * 16 * 1024 * 1024 / _best_time(lambda: weight.apply(x), repeats))
    return HardwareProfile(f"this CPU ({torch.get_num_threads()} threads)", bandwidth, flops,
                           packed_rates=probe_packed_rates(buffer_mb // 2, repeats, types))


def probe_jitter(num_bytes: int, repeats: int = 500) -> float:
    """p99 / p50 of the time to read `num_bytes` (one decode step's weights), the same work
    each time: the spread this machine itself adds to every step, under any engine's
    inter-token p99 / p50."""
    data = torch.ones(max(num_bytes // 4, 1))
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[min(len(times) - 1, round(0.99 * (len(times) - 1)))] / times[len(times) // 2]


def probe_packed_rates(buffer_mb: int = 128, repeats: int = 5, types=None) -> dict[int, float]:
    """bytes/s of the planned step's GEMV at one activation row over a matrix far larger than
    the caches, for each type it reads (or those of `types`): the rate at which a decode step
    streams packed weights. Where the CPU has AVX-512 VNNI that is the kernel over rearranged
    weights, else the one that reads GGUF blocks in place."""
    kernels = native_kernels()
    if kernels is None:
        return {}
    rates = {}
    for qtype in sorted(NATIVE_TYPES if types is None else set(types) & NATIVE_TYPES):
        in_features = 1024
        blocks = _valid_blocks(qtype, buffer_mb * 2**20, in_features)
        x = torch.randn(1, in_features)
        if hasattr(kernels, "InterleavedWeight"):
            weight = kernels.InterleavedWeight(blocks, int(qtype), in_features)
            del blocks   # the rearranged copy is what streams; free the source before timing
            rates[int(qtype)] = weight.nbytes() / _best_time(lambda: weight.apply(x), repeats)
        else:
            rates[int(qtype)] = blocks.numel() / _best_time(lambda: kernels.gemv(x, blocks, int(qtype)), repeats)
    return rates


def _valid_blocks(qtype: QType, num_bytes: int, in_features: int) -> torch.Tensor:
    """About num_bytes of random blocks [rows, row bytes] under small, finite fp16 scales (no
    NaN or denormal work)."""
    elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks_per_row = in_features // elements
    rows = max(16, num_bytes // (blocks_per_row * block_bytes))
    data = torch.randint(0, 256, (rows, blocks_per_row, block_bytes), dtype=torch.uint8)
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)   # 2 bytes
    for at in HALF_FIELDS[qtype]:
        data[:, :, at:at + 2] = scale
    return data.reshape(rows, blocks_per_row * block_bytes)


def _best_time(work, repeats: int) -> float:
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best
