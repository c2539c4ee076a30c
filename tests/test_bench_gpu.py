"""bench/gpu_decode.py, the GPU check, kept working on the CPU with a tiny shape."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _load_script(name: str):
    """A bench script as a module, by its path: bench/ stays off sys.path, where its file
    names would shadow installed packages for every test after this one."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_decode = _load_script("gpu_decode")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_shape_on_the_cpu(capsys, dtype):
    gpu_decode.main(["--device", "cpu", "--shape", "tiny", "--tokens", "4", "--dtype", dtype])
    out = capsys.readouterr().out
    for way in ("eager", "graphs", "int4 + graphs"):
        assert f"tiny {dtype} {way} on cpu" in out
    assert out.count("floor on NVIDIA H200") == 3
    # The fixed-shape step gives the eager step's greedy tokens.
    assert "greedy tokens as eager: 4/4" in out
