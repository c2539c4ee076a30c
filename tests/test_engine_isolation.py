"""A fault inside a step fails that request alone: the others in the batch keep their exact
tokens, every KV block comes back, and the engine goes on serving. Faults are injected in
sampling, in the forward pass (eager and planned), in detokenizing and in admission."""
from __future__ import annotations

import asyncio

import pytest
import torch

from hayate.engine.async_engine import AsyncEngine
from hayate.engine.request import RequestFailedError
from hayate.kernels import native_kernels
from hayate.layers.sampler import SamplingState
from hayate.llm import LLM
from hayate.sampling import MAX_TOP_K, SamplingParams
from gguf_files import QType, export_hf_model, tiny_model
from tiny_models import make_tiny_model

POISON_SEED = 666          # a request with this seed makes the injected sampling fault fire
POISON_TOKEN = 111         # a step holding this token id makes the injected forward fault fire
PROMPTS = [[3, 17, 5, 60, 21, 8, 44, 9], [7, 7, 1, 4], list(range(10, 47))]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=5, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-isolation")
    make_tiny_model("llama", folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(model_folder):
    """Each prompt's tokens, greedy and seeded, with no fault anywhere."""
    llm = LLM(model_folder, max_num_seqs=4)
    return {params.temperature: [r.token_ids for r in llm.generate(PROMPTS, params)] for params in (GREEDY, SEEDED)}


def run_all(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Step the engine until every request ends; each request's outputs, in order."""
    outputs: dict[str, list] = {request_id: [] for request_id in requests}
    for request_id, (prompt, params) in requests.items():
        llm.engine.add_request(request_id, prompt, params)
    while llm.engine.has_unfinished():
        for output in llm.engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


def tokens(outputs: list) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


def assert_all_blocks_free(llm: LLM) -> None:
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.engine.has_unfinished()


def assert_failed_alone(outputs: dict[str, list], failed: str, reference: dict) -> None:
    assert outputs[failed][-1].finish_reason == "error" and outputs[failed][-1].error
    for index, params in enumerate((GREEDY, SEEDED)):
        request_id = f"ok-{index}"
        assert outputs[request_id][-1].finish_reason == "length"
        assert tokens(outputs[request_id]) == reference[params.temperature][index]


def poison_sampler(llm: LLM) -> None:
    sample = llm.engine.runner.sampler

    def sampler(logits, states):
        if any(state.params.seed == POISON_SEED for state in states):
            raise RuntimeError("injected sampling fault")
        return sample(logits, states)

    llm.engine.runner.sampler = sampler


def poison_forward(llm: LLM, method: str) -> None:
    runner = llm.engine.runner
    forward = getattr(runner, method)

    def faulty(sequences, sampling, *rows):
        if any(POISON_TOKEN in s.request.token_ids(s.start, s.num_tokens) for s in sequences):
            raise RuntimeError("injected forward fault")
        return forward(sequences, sampling, *rows)

    setattr(runner, method, faulty)


def with_victim(victim: tuple[list[int], SamplingParams]) -> dict[str, tuple[list[int], SamplingParams]]:
    return {"ok-0": (PROMPTS[0], GREEDY), "victim": victim, "ok-1": (PROMPTS[1], SEEDED)}


def test_a_sampling_fault_fails_only_its_request(model_folder, reference):
    llm = LLM(model_folder, max_num_seqs=4)
    poison_sampler(llm)
    victim = (PROMPTS[2], SamplingParams(max_tokens=12, temperature=1.0, seed=POISON_SEED))
    outputs = run_all(llm, with_victim(victim))
    assert_failed_alone(outputs, "victim", reference)
    assert "injected sampling fault" in outputs["victim"][-1].error
    assert_all_blocks_free(llm)
    assert llm.generate(PROMPTS[0], GREEDY).token_ids == reference[0][0]   # still serving


def test_an_eager_forward_fault_fails_only_its_request(model_folder, reference):
    llm = LLM(model_folder, max_num_seqs=4)
    poison_forward(llm, "_eager_logits")
    outputs = run_all(llm, with_victim(([5, POISON_TOKEN, 9], GREEDY)))
    assert_failed_alone(outputs, "victim", reference)
    assert_all_blocks_free(llm)


def test_a_fault_after_tokens_were_streamed_ends_that_stream(model_folder, reference):
    """The victim decodes a few tokens, then its detokenizer raises mid-stream."""
    llm = LLM(model_folder, max_num_seqs=4)
    llm.engine.add_request("victim", PROMPTS[2], GREEDY)
    for _ in range(3):
        llm.engine.step()
    llm.engine.sequences["victim"].detokenizer.push = lambda token_id: 1 / 0
    outputs = run_all(llm, {"ok-0": (PROMPTS[0], GREEDY), "ok-1": (PROMPTS[1], SEEDED)})
    assert outputs["victim"][-1].finish_reason == "error" and "ZeroDivisionError" in outputs["victim"][-1].error
    for index, params in enumerate((GREEDY, SEEDED)):
        assert tokens(outputs[f"ok-{index}"]) == reference[params.temperature][index]
    assert not llm.engine.sequences
    assert_all_blocks_free(llm)


def test_the_llm_api_raises_for_a_failed_request(model_folder):
    llm = LLM(model_folder, max_num_seqs=4)
    poison_sampler(llm)
    bad = SamplingParams(max_tokens=4, temperature=1.0, seed=POISON_SEED)
    with pytest.raises(RequestFailedError, match="injected sampling fault"):
        llm.generate(PROMPTS[0], bad)
    with pytest.raises(RequestFailedError):
        list(llm.stream(PROMPTS[0], bad))
    assert_all_blocks_free(llm)


def test_top_k_at_its_limit_samples(model_folder):
    llm = LLM(model_folder, max_num_seqs=2)
    params = SamplingParams(max_tokens=4, temperature=1.0, top_k=MAX_TOP_K, seed=3)
    assert len(llm.generate(PROMPTS[0], params).token_ids) == 4


def test_async_engine_fails_one_stream_and_keeps_serving(model_folder, reference, monkeypatch):
    llm = LLM(model_folder, max_num_seqs=4)
    poison_sampler(llm)
    engine = AsyncEngine(llm.engine)
    engine.start()
    create = SamplingState.create

    def faulty_create(params, prompt_token_ids, device="cpu"):
        if params.seed == POISON_SEED + 1:
            raise RuntimeError("injected admission fault")
        return create(params, prompt_token_ids, device)

    monkeypatch.setattr(SamplingState, "create", faulty_create)

    async def collect(request_id, prompt, params):
        try:
            return [t async for output in engine.generate(request_id, prompt, params) for t in output.token_ids]
        except RequestFailedError as error:
            return error

    async def main():
        return await asyncio.gather(
            collect("a", PROMPTS[0], GREEDY),
            collect("b", PROMPTS[2], SamplingParams(max_tokens=12, temperature=1.0, seed=POISON_SEED)),
            collect("c", PROMPTS[2], SamplingParams(max_tokens=12, temperature=1.0, seed=POISON_SEED + 1)),
            collect("d", PROMPTS[1], SEEDED))

    try:
        good, sampling_fault, admission_fault, seeded = asyncio.run(main())
        assert good == reference[0][0] and seeded == reference[SEEDED.temperature][1]
        assert isinstance(sampling_fault, RequestFailedError) and isinstance(admission_fault, RequestFailedError)
        assert engine.is_alive
        assert asyncio.run(collect("e", PROMPTS[0], GREEDY)) == reference[0][0]
    finally:
        engine.shutdown()
    assert_all_blocks_free(llm)


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_a_planned_forward_fault_fails_only_its_request(tmp_path):
    path = str(export_hf_model(tmp_path / "llama.gguf", tiny_model("llama"), "llama", QType.Q4_1))
    llm = LLM(path, max_num_seqs=4)
    assert llm.engine.runner.plan is not None
    expected = [r.token_ids for r in llm.generate(PROMPTS[:2], GREEDY)]
    poison_forward(llm, "_planned_logits")
    outputs = run_all(llm, {"ok-0": (PROMPTS[0], GREEDY), "victim": ([5, POISON_TOKEN, 9], GREEDY),
                            "ok-1": (PROMPTS[1], GREEDY)})
    assert outputs["victim"][-1].finish_reason == "error"
    assert [tokens(outputs["ok-0"]), tokens(outputs["ok-1"])] == expected
    assert_all_blocks_free(llm)
    torch.testing.assert_close(torch.tensor(llm.generate(PROMPTS[0], GREEDY).token_ids), torch.tensor(expected[0]))
