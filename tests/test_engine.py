"""The engine core on a tiny random model: batching, chunked prefill, preemption and
aborts must never change a request's tokens, and must give every KV block back."""
from __future__ import annotations

import pytest

from hayate.llm import LLM
from hayate.sampling import SamplingParams
from tiny_models import make_tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", folder)
    return str(folder)


def prompts(count: int, length: int = 12) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 250 for j in range(length + i % 5)] for i in range(count)]


def alone(model_folder, batch, params=GREEDY):
    llm = LLM(model_folder, max_num_seqs=1)
    return [llm.generate(prompt, params).token_ids for prompt in batch]


def assert_all_blocks_free(llm: LLM) -> None:
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    assert not llm.engine.has_unfinished()


def test_batched_equals_alone(model_folder):
    batch = prompts(16)
    llm = LLM(model_folder, max_num_seqs=16)
    results = llm.generate(batch, GREEDY)
    assert [r.token_ids for r in results] == alone(model_folder, batch)
    assert_all_blocks_free(llm)


def test_seeded_sampling_is_batch_invariant(model_folder):
    batch = prompts(6)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    llm = LLM(model_folder, max_num_seqs=6)
    assert [r.token_ids for r in llm.generate(batch, params)] == alone(model_folder, batch, params)


def test_chunked_prefill_of_a_long_prompt_beside_running_streams(model_folder):
    batch = prompts(3) + [list(range(3, 200))]
    llm = LLM(model_folder, max_num_seqs=4, prefill_chunk=16)
    results = llm.generate(batch, GREEDY)
    assert [r.token_ids for r in results] == alone(model_folder, batch)


def test_preemption_when_kv_cache_runs_out(model_folder):
    """Room for one full context only: requests are preempted and recomputed."""
    batch = prompts(6, length=40)
    llm = LLM(model_folder, max_num_seqs=6, max_model_len=128, kv_cache_tokens=128, block_size=8)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    results = llm.generate(batch, params)
    assert [r.token_ids for r in results] == alone(model_folder, batch, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_abort_frees_blocks_and_spares_others(model_folder):
    llm = LLM(model_folder, max_num_seqs=4)
    kept = llm.stream(prompts(1)[0], GREEDY)
    doomed = llm.stream(prompts(2)[1], SamplingParams(max_tokens=200, ignore_eos=True))
    next(doomed)
    doomed.close()
    assert [t for o in kept for t in o.token_ids] == alone(model_folder, prompts(1))[0]
    assert_all_blocks_free(llm)


def test_finish_reasons_and_limits(model_folder):
    llm = LLM(model_folder, max_model_len=64)
    assert llm.generate(prompts(1)[0], SamplingParams(max_tokens=5, ignore_eos=True)).finish_reason == "length"
    long = llm.generate(list(range(60)), SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))
    assert long.finish_reason == "length" and len(long.token_ids) == 4  # the context is full
    with pytest.raises(ValueError, match="context"):
        llm.generate(list(range(64)), GREEDY)
    first = alone(model_folder, prompts(1))[0][0]
    stopped = llm.generate(prompts(1)[0], SamplingParams(temperature=0, stop_token_ids=[first]))
    assert stopped.finish_reason == "stop" and stopped.token_ids == [first]


def test_stop_string_truncates_text(model_folder):
    llm = LLM(model_folder)
    full = llm.generate(prompts(1)[0], GREEDY)
    # The first spot (past the start) whose two characters occur nowhere earlier.
    cut = next(k for k in range(2, len(full.text) - 1) if full.text.find(full.text[k:k + 2]) == k)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[full.text[cut:cut + 2]])
    result = llm.generate(prompts(1)[0], params)
    assert result.finish_reason == "stop" and result.text == full.text[:cut]


def test_async_engine_stream_and_early_exit(model_folder):
    import asyncio

    from hayate.engine.async_engine import AsyncEngine

    llm = LLM(model_folder, max_num_seqs=2)
    engine = AsyncEngine(llm.engine)
    engine.start()

    async def run():
        tokens = [t async for o in engine.generate("a", prompts(1)[0], GREEDY) for t in o.token_ids]
        async for _ in engine.generate("b", prompts(2)[1], SamplingParams(max_tokens=200, ignore_eos=True)):
            break   # leaving early aborts the request
        await asyncio.sleep(0.2)
        return tokens

    try:
        assert asyncio.run(run()) == alone(model_folder, prompts(1))[0]
        assert engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0
    finally:
        engine.shutdown()


def test_async_engine_loads_on_its_own_thread(model_folder):
    import asyncio
    import threading

    from hayate.engine.async_engine import AsyncEngine

    def build():
        return LLM(model_folder), threading.current_thread()

    (llm, loader), engine = AsyncEngine.start_with(build, lambda built: built[0].engine)
    try:
        assert loader is engine._thread and loader.name == "hayate-engine" and engine.is_alive

        async def run():
            return [t async for o in engine.generate("a", prompts(1)[0], GREEDY) for t in o.token_ids]

        assert asyncio.run(run()) == alone(model_folder, prompts(1))[0]
    finally:
        engine.shutdown()
    assert not engine.is_alive
    with pytest.raises(ValueError, match="no such"):
        AsyncEngine.start_with(lambda: LLM("/no/such/model"), lambda llm: llm.engine)


def test_prefix_caching_keeps_the_answers(model_folder):
    """A chat's next turn starts with the whole previous turn: its blocks come from the cache,
    and the answer is the one a full prefill gives."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    first_turn = list(range(3, 70))
    cached, uncached = LLM(model_folder, max_num_seqs=2), LLM(model_folder, max_num_seqs=2, prefix_caching=False)
    answer = cached.generate(first_turn, params)
    assert answer.num_cached_tokens == 0
    second_turn = first_turn + answer.token_ids + [5, 9, 11]
    again, reference = cached.generate(second_turn, params), uncached.generate(second_turn, params)
    # the first turn computed its prompt and 11 of its 12 tokens (the last was only sampled)
    assert again.num_cached_tokens == (len(first_turn) + 11) // 16 * 16 == 64
    assert reference.num_cached_tokens == 0
    assert again.token_ids == reference.token_ids
    assert [lp.logprob for lp in again.logprobs] == pytest.approx([lp.logprob for lp in reference.logprobs], abs=1e-4)
    assert_all_blocks_free(cached)


def test_shared_prefix_blocks_survive_preemption(model_folder):
    """Six requests share one prompt's blocks in a cache that holds one full context: they
    are preempted and recomputed, sharing again, and every block comes back at the end."""
    prompt = prompts(1, length=40)[0]
    llm = LLM(model_folder, max_num_seqs=6, max_model_len=128, kv_cache_tokens=128, block_size=8)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    results = llm.generate([prompt] * 6, params)
    assert [r.token_ids for r in results] == alone(model_folder, [prompt], params) * 6
    assert llm.engine.scheduler.num_preemptions > 0
    assert max(r.num_cached_tokens for r in results) > 0
    assert_all_blocks_free(llm)
