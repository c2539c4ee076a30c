"""Tensor parallel over torch.distributed (gloo, worker processes on this machine): the slicing
held to the whole weights, the step message, and TP=2 giving TP=1's greedy tokens on tiny dense
and MoE models (packed and float weights, biases, uneven head splits, expert parallel); a
killed worker stops the engine with a clear error instead of a hang."""
from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from hayate.config import EngineConfig
from hayate.engine.tensor_parallel import WorkerLostError, read_step, step_message
from hayate.layers.linear import PackedLinear
from hayate.layers.quant import PackedWeight
from hayate.layers.tensor_parallel import Shard, take_columns, take_rows
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from gguf_files import QType, encode, export_hf_model, tiny_model
from test_mixtral import TINY as MIXTRAL, export_gguf as export_mixtral
from test_moe_families import COMMON, FAMILIES
from tiny_models import save_family

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 14, 20, 33], [1, 7], [1, 90, 3, 3, 3, 41, 60, 2, 8, 100, 11], [1, 64, 65], [1, 120, 4, 18]]


def greedy_tokens(path, prompts=PROMPTS, **settings) -> list[list[int]]:
    llm = LLM(path and str(path), max_model_len=128, max_num_seqs=len(prompts), threads=2, **settings)
    try:
        return [result.token_ids for result in llm.generate(prompts, GREEDY)]
    finally:
        llm.engine.close()


# ---- slicing -----------------------------------------------------------------------------------

def test_split_deals_units_out_unevenly_and_completely():
    assert [Shard(rank, 2).split(3) for rank in range(2)] == [(0, 2), (2, 3)]
    parts = [Shard(rank, 3).split(8) for rank in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 8)]


def packed_q8_0(rows: int = 6, cols: int = 96) -> tuple[PackedLinear, torch.Tensor]:
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    layer = PackedLinear(PackedWeight(torch.from_numpy(encode(values, QType.Q8_0)), QType.Q8_0, (rows, cols)))
    return layer, layer.weight.dequantize()


def test_column_cuts_keep_blocks_on_boundaries_and_dequantize_across_them():
    layer, whole = packed_q8_0()
    kept = take_columns(layer, 32, 96)
    assert isinstance(kept, PackedLinear) and kept.in_features == 64
    assert torch.equal(kept.weight.dequantize(), whole[:, 32:96])
    cut = take_columns(layer, 16, 48)   # through the middle of two blocks
    assert isinstance(cut, nn.Linear) and torch.equal(cut.weight, whole[:, 16:48])


def test_row_ranges_stack_in_order_with_their_bias():
    layer, whole = packed_q8_0()
    layer.bias = nn.Parameter(torch.arange(6.0), requires_grad=False)
    taken = take_rows(layer, [(4, 6), (0, 1)])
    assert torch.equal(taken.weight.dequantize(), torch.cat([whole[4:6], whole[0:1]]))
    assert torch.equal(taken.bias, torch.tensor([4.0, 5.0, 0.0]))


def test_step_message_round_trip_and_end():
    tables, starts, counts, ids = [[3, 1, 4], [9]], [17, 0], [1, 2], [100, 7, 8]
    stream = io.BytesIO(step_message(tables, starts, counts, ids) * 2)
    assert read_step(stream) == (tables, starts, counts, ids)
    assert read_step(stream) == (tables, starts, counts, ids)
    assert read_step(stream) is None
    assert read_step(io.BytesIO(step_message(tables, starts, counts, ids)[:-3])) is None   # cut short


@pytest.mark.parametrize("settings", [dict(tensor_parallel=0), dict(tensor_parallel=2, device="cuda"),
                                      dict(expert_parallel=True)])
def test_config_refuses_impossible_settings(settings):
    with pytest.raises(ValueError):
        EngineConfig(**settings)


# ---- TP=2 against TP=1 ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch, qtype", [("llama", QType.Q8_0), ("qwen2", QType.Q4_0), ("llama", QType.F32)])
def test_dense_gguf_tp2_equals_tp1(arch, qtype, tmp_path):
    """Q8_0 / Q4_0 packed (Qwen2: q/k/v biases) and F32 files; 2 key-value heads, one per rank."""
    path = export_hf_model(tmp_path / f"{arch}.gguf", tiny_model(arch), arch, qtype)
    assert greedy_tokens(path, tensor_parallel=2) == greedy_tokens(path)


def test_default_model_splits_three_kv_heads_two_and_one():
    """SmolLM2-135M: 9 query heads over 3 key-value heads, 6 + 3 on two ranks; the planned step
    (TP=1) against the ranks' eager steps."""
    prompts = [[1, 504, 3575, 282, 4649, 314], [1, 1208, 7757, 30]]
    assert greedy_tokens(None, prompts, tensor_parallel=2) == greedy_tokens(None, prompts)


@pytest.fixture(scope="module")
def mixtral_file(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    reference = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL)).eval()
    return export_mixtral(tmp_path_factory.mktemp("mixtral") / "mixtral.gguf", reference, QType.Q8_0,
                          matrix_type=QType.Q8_0)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_mixtral_packed_experts_tp2_equals_tp1(mixtral_file, expert_parallel):
    prompts = [[p % MIXTRAL["vocab_size"] for p in prompt] for prompt in PROMPTS]
    expected = greedy_tokens(mixtral_file, prompts)
    assert greedy_tokens(mixtral_file, prompts, tensor_parallel=2, expert_parallel=expert_parallel) == expected


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_qwen2_moe_float_experts_and_shared_expert_tp2_equals_tp1(tmp_path, expert_parallel):
    save_family(FAMILIES, "qwen2_moe", COMMON, tmp_path)
    expected = greedy_tokens(tmp_path)
    assert greedy_tokens(tmp_path, tensor_parallel=2, expert_parallel=expert_parallel) == expected


def test_too_few_kv_heads_refused_before_workers_start(tmp_path):
    path = export_hf_model(tmp_path / "mqa.gguf", tiny_model("llama", num_key_value_heads=1), "llama")
    with pytest.raises(ValueError, match="at least 2 key-value heads"):
        LLM(str(path), tensor_parallel=2)


# ---- a worker that dies ------------------------------------------------------------------------------

@pytest.fixture
def tp_llm(tmp_path):
    path = export_hf_model(tmp_path / "llama.gguf", tiny_model("llama"), "llama", QType.Q8_0)
    llm = LLM(str(path), max_model_len=256, tensor_parallel=2, threads=2)
    yield llm
    llm.engine.close()


def test_worker_killed_mid_generation_raises_clear_error(tp_llm):
    worker = tp_llm.engine.parallel.workers[0]
    threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(WorkerLostError, match="worker 1 exited"):
        for _ in range(100):   # until the kill lands
            tp_llm.generate([1, 2, 3], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    assert time.monotonic() - started < 60   # an error, not the step timeout's wait


def test_worker_killed_between_requests_stops_the_async_engine(tp_llm):
    from hayate.engine.async_engine import AsyncEngine

    engine = AsyncEngine(tp_llm.engine)
    engine.start()
    try:
        os.kill(tp_llm.engine.parallel.workers[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while engine.is_alive and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not engine.is_alive and "worker 1 exited" in str(engine.error)
    finally:
        engine.shutdown()


def test_served_tp2_answers_then_turns_unhealthy_when_a_worker_dies(tmp_path):
    """`hayate serve --tensor-parallel 2`'s path: the official client streams an answer; with a
    worker killed, /health says why with 503 and a new request gets an OpenAI-format 503."""
    import httpx
    import openai

    from hayate.server import ServedModel, ServerSettings, create_app
    from server_harness import ServerThread, openai_client, wait_until

    path = export_hf_model(tmp_path / "llama.gguf", tiny_model("llama"), "llama", QType.Q8_0)
    llms = []

    def load() -> ServedModel:
        llms.append(LLM(str(path), max_model_len=256, tensor_parallel=2, threads=2))
        return ServedModel.from_llm(llms[0], 8)

    server = ServerThread(create_app(ServerSettings(), load, hardware=None)).start()
    try:
        client = openai_client(server)
        stream = client.completions.create(model=client.models.list().data[0].id, prompt=[1, 5, 9], max_tokens=8,
                                           temperature=0, stream=True)
        assert sum(1 for _ in stream) >= 1
        os.kill(llms[0].engine.parallel.workers[0].pid, signal.SIGKILL)
        assert wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503, timeout=20)
        assert "worker 1 exited" in httpx.get(f"{server.url}/health").json()["detail"]
        with pytest.raises(openai.APIStatusError) as error:
            client.completions.create(model="any", prompt=[1, 5, 9], max_tokens=4)
        assert error.value.status_code == 503
    finally:
        server.stop()


def test_gemma3_windows_and_output_norms_tp2_equals_tp1(tmp_path):
    """Gemma 3 (sliding windows, QK-norm, norms on each output, GeGLU) as a Q8_0 file."""
    from test_gemma3 import export_gguf as export_gemma, random_gemma

    path = export_gemma(tmp_path / "gemma.gguf", random_gemma(), QType.Q8_0)
    assert greedy_tokens(path, tensor_parallel=2) == greedy_tokens(path)
