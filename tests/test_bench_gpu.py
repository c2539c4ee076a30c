"""bench/gpu_decode.py, the GPU check, kept working on the CPU with a tiny shape."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_decode  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_shape_on_the_cpu(capsys, dtype):
    gpu_decode.main(["--device", "cpu", "--shape", "tiny", "--tokens", "4", "--dtype", dtype])
    out = capsys.readouterr().out
    for way in ("eager", "graphs", "int4 + graphs"):
        assert f"tiny {dtype} {way} on cpu" in out
    assert out.count("floor on NVIDIA H200") == 3
    # The fixed-shape step gives the eager step's greedy tokens.
    assert "greedy tokens as eager: 4/4" in out
