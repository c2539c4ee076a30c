"""Native kernels (GGUF-block GEMV and dequantization, and the small per-token operators
RMSNorm and RoPE), compiled on first use with PyTorch's C++ extension builder and cached.

`native_kernels()` returns the compiled module, or None (with a warning saying why) where it
cannot be built: callers then keep the pure-PyTorch path, which gives the same values."""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger("hayate.kernels")


SOURCES = ("native.cpp", "decode.cpp", "vision_attention.cpp", "block_formats.h", "ggml_blocks.h", "interleaved.h", "interleaved_fill.h",
           "interleaved_kernel.h", "decode_attention.h", "kv_elements.h", "worker_pool.h", "packed_matrix.h",
           "routed_experts.h", "activations.h")


def _build_fingerprint() -> str:
    """Built with -march=native, a kernel is only valid on the CPU that built it; the sources'
    text is part of the name too, so an edited header always rebuilds."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    sources = b"".join(Path(__file__).with_name(name).read_bytes() for name in SOURCES)
    return hashlib.sha256(f"{flags}|{torch.__version__}".encode() + sources).hexdigest()[:12]


@functools.cache
def native_kernels():
    """The compiled kernels (gemv, dequantize, rms_norm, rope_, DecodePlan), built once per machine."""
    try:
        from torch.utils.cpp_extension import load

        sources = [str(Path(__file__).with_name(name)) for name in SOURCES if name.endswith(".cpp")]
        return load(name=f"hayate_ggml_{_build_fingerprint()}", sources=sources, verbose=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, a build error: fall back, loudly
        log.warning("native GGUF kernels unavailable (%s); using the PyTorch path", error)
        return None


# A decode step's few rows: past this many (prefill), PyTorch's parallel operators win.
MAX_NATIVE_ROWS = 16


def kernels_for_rows(x: torch.Tensor, num_rows: int):
    """The native kernels when `x` is float32 on the CPU and the work is a decode step's few
    rows (at most MAX_NATIVE_ROWS), else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or num_rows > MAX_NATIVE_ROWS:
        return None
    return native_kernels()
