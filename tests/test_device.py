"""The device and dtype settings: the path CUDA runs (weights dequantized, bfloat16 weights,
activations and KV cache, the eager step) exercised on the CPU in bfloat16, compared with
the float32 reference; CUDA itself where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from hayate.config import EngineConfig
from hayate.layers.fast_linear import Int4Linear
from hayate.llm import LLM
from hayate.loading.loader import ModelLoadError
from hayate.sampling import SamplingParams
from gguf_files import QType, export_hf_model, tiny_model
from tiny_models import make_tiny_model

PROMPT = [3, 17, 5, 60, 21, 8, 44, 9]
FIRST = SamplingParams(max_tokens=1, temperature=0, logprobs=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device")
    make_tiny_model("llama", folder)
    return str(folder)


def first_token(llm: LLM) -> dict[int, float]:
    result = llm.generate(PROMPT, FIRST)
    return dict(result.logprobs[0].top)


def test_bad_device_and_dtype_settings():
    with pytest.raises(ValueError, match="device must be"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="dtype must be"):
        EngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="run on the CPU only"):
        EngineConfig(device="cuda", weights="packed")
    assert EngineConfig(device="cuda", weights="int4-bf16").weights == "int4-bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_one_clear_error(folder, tmp_path):
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        LLM(folder, device="cuda")
    path = str(export_hf_model(tmp_path / "m.gguf", tiny_model("llama"), "llama", QType.Q4_1))
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        LLM(path, device="cuda:0")


def test_bfloat16_runs_the_dequantized_eager_path_close_to_float32(folder):
    half, full = LLM(folder, dtype="bfloat16"), LLM(folder)
    runner = half.engine.runner
    assert runner.plan is None and runner.kv_cache.storage.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in runner.model.parameters())
    ours, reference = first_token(half), first_token(full)
    assert next(iter(ours)) == next(iter(reference))            # the same greedy token
    for token, logprob in reference.items():
        if token in ours:
            assert abs(ours[token] - logprob) < 0.1               # bf16: about 3 significant digits
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = half.generate([PROMPT, PROMPT[:3]], params)        # chunked, batched, decoded in bf16
    assert [len(r.token_ids) for r in batched] == [12, 12]


def test_int4_in_bfloat16_runs_the_int4_kernels_close_to_float32(tmp_path):
    """The int4 path on CUDA (weights-only int4, bf16 everything else), here on the CPU."""
    path = str(export_hf_model(tmp_path / "m.gguf", tiny_model("llama"), "llama", QType.Q4_1))
    int4, full = LLM(path, dtype="bfloat16", weights="int4-bf16"), LLM(path, weights="fp32")
    model = int4.engine.runner.model
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 2 * 4 + 1   # qkv, o, gate_up, down; head
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ours, reference = first_token(int4), first_token(full)
    # bf16 residuals, norms and cache on top of bf16 activations: tails move up to ~1 nat on
    # this model (weights N(0, 1), logits ~25); the choice and the top five stay.
    best = next(iter(reference))
    assert next(iter(ours)) == best and abs(ours[best] - reference[best]) < 0.1
    assert set(ours) == set(reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu_reference(folder):
    gpu, cpu = LLM(folder, device="cuda"), LLM(folder)
    assert next(iter(first_token(gpu))) == next(iter(first_token(cpu)))


def test_a_folder_too_big_for_float32_runs_in_bfloat16():
    from hayate.loading.loader import placement

    huge = 10 ** 15
    assert placement(EngineConfig(), huge) == (torch.device("cpu"), torch.bfloat16)
    assert placement(EngineConfig(), 10 ** 6) == (torch.device("cpu"), torch.float32)
    assert placement(EngineConfig(dtype="float32"), huge)[1] == torch.float32
