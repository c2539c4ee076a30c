"""Hardware profiles: what this machine can move and compute, measured by a short probe,
plus datasheet figures for common GPUs."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    bandwidth: float       # bytes/s of memory read
    flops: float           # FLOP/s of the matmul precision the engine runs

    def floor_seconds(self, num_bytes: int, num_flops: int) -> float:
        """Roofline: a step can be no faster than its bytes or its FLOPs allow."""
        return max(num_bytes / self.bandwidth, num_flops / self.flops)


def datasheet_profiles() -> dict[str, HardwareProfile]:
    """Dense bf16 tensor-core FLOP/s and HBM bandwidth from the vendors' datasheets."""
    return {
        "h200": HardwareProfile("NVIDIA H200", 4.8e12, 989e12),
        "h100": HardwareProfile("NVIDIA H100 SXM", 3.35e12, 989e12),
        "a100": HardwareProfile("NVIDIA A100 80GB SXM", 2.04e12, 312e12),
        "l4": HardwareProfile("NVIDIA L4", 0.30e12, 121e12),
        "rtx4090": HardwareProfile("NVIDIA RTX 4090", 1.01e12, 165e12),
    }


def probe_cpu(threads: int | None = None, buffer_mb: int = 256, repeats: int = 5) -> HardwareProfile:
    """Measure read bandwidth (summing a buffer far larger than the caches) and fp32 matmul
    rate with the given thread count; best of `repeats` to skip warm-up noise."""
    if threads:
        torch.set_num_threads(threads)
    data = torch.ones(buffer_mb * 2**20 // 4)
    bandwidth = data.numel() * 4 / _best_time(lambda: data.sum(), repeats)
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    flops = 2 * 512 * 1024 * 1024 / _best_time(lambda: a @ b, repeats)
    return HardwareProfile(f"this CPU ({torch.get_num_threads()} threads)", bandwidth, flops)


def _best_time(work, repeats: int) -> float:
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best
