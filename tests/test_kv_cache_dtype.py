"""A float16 / bfloat16 KV cache (EngineConfig.kv_cache_dtype): both paths store keys and
values rounded exactly as torch's .to() rounds them, the planned step reading the half cache
matches the eager model reading it, and answers stay close to the exact fp32 cache's.

Where the CPU has AVX-512 VNNI the planned step's keys differ from the eager model's by fp32
ulps (test_decode_plan.py), and a few of them (under 1% here) then round to another half:
each path's cache holds torch's rounding of its own keys bit for bit, and the two caches
differ in those few elements, by about a rounding step. That moves the tiny GGUF models'
logprobs (whose N(0, 1) weights give logits of ~25) by up to ~3e-3, so the planned-vs-eager
bound here is 1e-2 where the fp32 cache's is 1e-3."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hayate.cli import build_parser, engine_config, main
from hayate.config import EngineConfig
from hayate.engine.engine import _kv_cache_blocks
from hayate.engine.kv_cache import KVCache
from hayate.kernels import native_kernels
from hayate.llm import LLM
from hayate.plan.cost import decode_cost
from hayate.sampling import SamplingParams
from test_decode_plan import PARAMS, PROMPTS, assert_same, planned_and_eager
from gguf_files import QType, export_hf_model, tiny_model
from tiny_models import make_tiny_model

HALF = ["float16", "bfloat16"]
needs_native = pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")


@pytest.fixture(scope="module", params=[("llama", QType.Q4_1), ("qwen2", QType.Q4_0)], ids=lambda c: c[0])
def gguf_path(request, tmp_path_factory):
    arch, qtype = request.param
    path = tmp_path_factory.mktemp("kv") / f"{arch}.gguf"
    return str(export_hf_model(path, tiny_model(arch), arch, qtype))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", folder)
    return str(folder)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16) if tensor.element_size() == 2 else tensor.view(torch.int32)


def test_config_rejects_an_unknown_kv_cache_dtype():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, float16, bfloat16, got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_cache_holds_half_the_bytes_per_token(dtype):
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
    assert KVCache.bytes_per_token(config, dtype) * 2 == KVCache.bytes_per_token(config, torch.float32)
    cache, exact = KVCache(config, 4, 16, dtype=dtype), KVCache(config, 4, 16)
    assert (cache.element_size, cache.nbytes * 2) == (2, exact.nbytes)


def test_sized_by_memory_a_half_cache_holds_twice_the_tokens(monkeypatch):
    """With no kv_cache_tokens the cache gets a fifth of memory: twice the tokens at 2 bytes."""
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
    loaded = SimpleNamespace(config=config, max_model_len=256)
    fp32_token = KVCache.bytes_per_token(config, torch.float32)
    memory = SimpleNamespace(total=5 * 1024 * fp32_token)   # a fifth: 1024 fp32 tokens
    monkeypatch.setattr("hayate.engine.engine.psutil.virtual_memory", lambda: memory)
    engine = EngineConfig(max_num_seqs=64, block_size=16)
    assert _kv_cache_blocks(engine, loaded, torch.float32) == 1024 // 16
    assert _kv_cache_blocks(engine, loaded, torch.float16) == 2048 // 16


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_store_rounds_like_torch(dtype):
    """Ties (to even), subnormals, overflow, signed zeros and random values: the bits the
    planned step stores are those of torch's .to()."""
    info = torch.finfo(dtype)
    below = (torch.randn(4096) * 8).to(dtype)
    above = (bits(below) + 1).view(dtype)                     # the next half away from zero
    ties = (below.float() + above.float()) / 2                # halfway: rounds to the even one
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), info.max, -info.max, info.tiny,
                            info.tiny / 2, info.tiny * 0.75, info.max * 1.001, 1 + 2 ** -11, 1 + 3 * 2 ** -11,
                            1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 ** -25, 3 * 2 ** -25, 65519.0, 65520.0])
    values = torch.cat([ties, torch.randn(4096) * 100, torch.randn(4096) * 1e-6, special])
    out = torch.empty(values.shape, dtype=dtype)
    native_kernels().store_kv(values, out)
    assert torch.equal(bits(out), bits(values.to(dtype)))
    nan = torch.empty(1, dtype=dtype)
    native_kernels().store_kv(torch.tensor([float("nan")]), nan)
    assert nan.isnan().all()


def layer0_after_prompts(path: str, **settings) -> torch.Tensor:
    """Layer 0's cache after prefilling PROMPTS (max_tokens 1: no generated token is stored);
    layer 0's keys come before any attention, so they do not depend on the cache's dtype."""
    llm = LLM(path, **settings)
    llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0))
    return llm.engine.runner.kv_cache.storage[0]


@needs_native
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("planned", [True, False], ids=["planned", "eager"])
def test_each_path_stores_torchs_rounding_of_its_keys(gguf_path, dtype, planned):
    exact = layer0_after_prompts(gguf_path, planned_decode=planned, max_num_seqs=4)
    half = layer0_after_prompts(gguf_path, planned_decode=planned, max_num_seqs=4, kv_cache_dtype=dtype)
    assert half.dtype == getattr(torch, dtype) and exact.dtype == torch.float32
    assert torch.count_nonzero(exact) > 0
    assert torch.equal(bits(half), bits(exact.to(half.dtype)))


@needs_native
@pytest.mark.parametrize("dtype", HALF)
def test_planned_steps_over_a_half_cache_equal_eager_steps(gguf_path, dtype):
    """Alone and batched over scattered blocks of 4; then the two caches: the same bits but
    in a few elements (0.02-0.6% here), none of them off by much (a step or two at the
    cache's largest values)."""
    for settings in ({}, {"max_num_seqs": 4, "block_size": 4}):
        planned, eager = planned_and_eager(gguf_path, kv_cache_dtype=dtype, **settings)
        for ours, theirs in zip(planned.generate(PROMPTS, PARAMS), eager.generate(PROMPTS, PARAMS)):
            assert_same(ours, theirs, tolerance=1e-2)
        ours, theirs = planned.engine.runner.kv_cache.storage, eager.engine.runner.kv_cache.storage
        assert (bits(ours) != bits(theirs)).float().mean() < 0.02
        largest = theirs.float().abs().max()
        assert (ours.float() - theirs.float()).abs().max() <= 2 * torch.finfo(ours.dtype).eps * largest


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_a_half_cache_stays_close_to_the_exact_one(model_folder, dtype, tolerance):
    """Prefill logprobs of the top tokens (the prefill reads its keys back from the cache):
    float16 keeps 11 significant bits, bfloat16 8, and on this tiny model they moved them by
    ~1e-3 and ~5e-3 (loss, not error: greedy answers may part at near ties later on)."""
    exact, half = LLM(model_folder, max_num_seqs=4), LLM(model_folder, max_num_seqs=4, kv_cache_dtype=dtype)
    assert half.engine.runner.kv_cache.storage.dtype == getattr(torch, dtype)
    prompts = [[(7 * i + 3 * j) % 250 for j in range(12 + i)] for i in range(4)] + [list(range(40, 90))]
    first = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    for ours, theirs in zip(half.generate(prompts, first), exact.generate(prompts, first)):
        reference = dict(theirs.logprobs[0].top)
        shared = [(i, value) for i, value in ours.logprobs[0].top if i in reference]
        assert len(shared) >= 4
        assert max(abs(value - reference[i]) for i, value in shared) < tolerance


@pytest.mark.parametrize("dtype", HALF)
def test_greedy_generation_with_prefix_caching_over_a_half_cache(model_folder, gguf_path, dtype):
    """The eager model (float folder) and the planned step (GGUF): a prompt run twice reuses
    its cached blocks and gives the same answer."""
    for path in (model_folder, gguf_path):
        llm = LLM(path, kv_cache_dtype=dtype)
        assert llm.config.prefix_caching
        prompt = list(range(10, 47)) + [3, 17, 5, 60, 21, 8, 44, 9]    # 45 tokens: two full blocks
        first, again = llm.generate(prompt, PARAMS), llm.generate(prompt, PARAMS)
        assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 32)
        assert again.token_ids == first.token_ids and len(first.token_ids) == PARAMS.max_tokens


@pytest.mark.parametrize("command", [["run", "hi"], ["chat"], ["serve"], ["plan"]])
def test_cli_takes_the_kv_cache_dtype(command):
    args = build_parser().parse_args([command[0], "--kv-cache-dtype", "bfloat16", *command[1:]])
    assert args.kv_cache_dtype == "bfloat16"
    assert build_parser().parse_args(command).kv_cache_dtype == "auto"
    if command[0] == "run":
        assert engine_config(args).kv_cache_dtype == "bfloat16"


def test_cli_rejects_a_bad_kv_cache_dtype(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--kv-cache-dtype", "int8", "hi"])
    assert exit_info.value.code == 2
    assert "--kv-cache-dtype" in capsys.readouterr().err


def test_plan_counts_the_kv_cache_at_its_element_size(model_folder, capsys):
    llm = LLM(model_folder, kv_cache_dtype="float16")
    model, config = llm.engine.runner.model, llm.model_config
    kv_bytes = llm.engine.runner.kv_cache.element_size
    half, exact = (next(row for row in decode_cost(model, config, 1, 10, size).rows if row.name.startswith("attention"))
                   for size in (kv_bytes, 4))
    assert kv_bytes == 2 and half.bytes * 2 == exact.bytes and half.flops == exact.flops
    assert main(["plan", "--model", model_folder, "--hardware", "h200", "--kv-cache-dtype", "float16"]) == 0
    out = " ".join(capsys.readouterr().out.split())   # rich wraps long lines
    assert "KV cache 0.25 KB a token (float16)" in out   # 2 layers x (k, v) x 2 kv heads x 16 x 2 bytes
