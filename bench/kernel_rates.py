"""Weights streaming through each type's kernels, side by side: the planned step's VNNI GEMV
(one activation row, the decode case) over many distinct [rows, cols] matrices cycled so
the weights come from memory, not the caches; optionally the fp32 block GEMV (the fallback)
on the same file bytes. The types take turns, round by round. Prints GB/s of the file's bytes, of the bytes actually read, and ns per weight.

    .venv/bin/python bench/kernel_rates.py [--rows 2048] [--cols 8192] [--mb 128] [--rounds 7]
        [--fallback] [--types Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K,Q5_0,Q5_1]

Run it on a quiet machine (see README.md): anything else running changes the figures."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kquant_blocks import random_blocks  # noqa: E402  (random valid blocks of any native type)

from hayate.kernels import native_kernels  # noqa: E402
from hayate.layers.quant import QType  # noqa: E402

TYPES = "Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K,Q5_0,Q5_1"


def cycle_seconds(matrices: list, x: torch.Tensor, multiply) -> tuple[float, float]:
    """Wall and CPU (all threads) time of one product, averaged over a cycle through every
    matrix: on a busy machine the CPU time still says what the kernel itself costs."""
    start, cpu = time.perf_counter(), time.process_time()
    for weight in matrices:
        multiply(weight, x)
    return (time.perf_counter() - start) / len(matrices), (time.process_time() - cpu) / len(matrices)


def prepare(kernels, qtype: QType, rows: int, cols: int, megabytes: int) -> dict:
    """~megabytes of distinct matrices of one type, rearranged; the time that took."""
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    file_bytes = rows * cols // elements * size
    count = max(2, megabytes * 2**20 // file_bytes)
    blocks = [random_blocks(qtype, rows, cols, seed=i) for i in range(count)]
    start = time.perf_counter()
    weights = kernels.InterleavedWeight.all(blocks, [int(qtype)] * count, [cols] * count)
    rearrange = (time.perf_counter() - start) / (count * rows * cols)
    return dict(qtype=qtype, blocks=blocks, weights=weights, file_bytes=file_bytes, rearrange=rearrange,
                vnni=float("inf"), cpu=float("inf"), fallback=float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--mb", type=int, default=128, help="file bytes of matrices per type, cycled")
    parser.add_argument("--rounds", type=int, default=7, help="the types take turns, best round kept")
    parser.add_argument("--fallback", action="store_true", help="also time the fp32 block GEMV (slower)")
    parser.add_argument("--types", default=TYPES)
    args = parser.parse_args()
    kernels = native_kernels()
    if kernels is None or not hasattr(kernels, "InterleavedWeight"):
        sys.exit("needs the native kernels on a CPU with AVX-512 VNNI")
    cases = [prepare(kernels, QType[name], args.rows, args.cols, args.mb) for name in args.types.split(",")]
    x = torch.randn(1, args.cols)
    for _ in range(args.rounds):   # in turns, so that a noisy moment hits every type alike
        for case in cases:
            wall, cpu = cycle_seconds(case["weights"], x, lambda w, v: w.apply(v))
            case["vnni"], case["cpu"] = min(case["vnni"], wall), min(case["cpu"], cpu)
            if args.fallback:
                gemv = lambda w, v, t=int(case["qtype"]): kernels.gemv(v, w, t)
                case["fallback"] = min(case["fallback"], cycle_seconds(case["blocks"], x, gemv)[0])
    weights = args.rows * args.cols
    print(f"[{args.rows} x {args.cols}] x 1 row, {torch.get_num_threads()} threads, ~{args.mb} MB of file bytes per type,"
          f" best of {args.rounds} rounds")
    print(f"{'type':6} {'bits/w held':>11} {'GB/s file':>10} {'GB/s read':>10} {'ns/weight':>10} "
          f"{'CPU ns/weight':>14} {'fp32 GEMV GB/s':>15} {'rearrange ns/w':>15}")
    for case in cases:
        held = case["weights"][0].nbytes()
        print(f"{case['qtype'].name:6} {8 * held / weights:11.3f} {case['file_bytes'] / case['vnni'] / 1e9:10.2f} "
              f"{held / case['vnni'] / 1e9:10.2f} {case['vnni'] / weights * 1e9:10.4f} {case['cpu'] / weights * 1e9:14.4f} "
              f"{case['file_bytes'] / case['fallback'] / 1e9:15.2f} {case['rearrange'] * 1e9:15.2f}")


if __name__ == "__main__":
    main()
