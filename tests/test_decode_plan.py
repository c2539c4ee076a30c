"""The planned decode step (one native call per step, hayate/kernels/decode.cpp) against its
slow twin, the eager model, on tiny GGUF models of every natively read type: the same logits
to fp32 rounding, the same greedy tokens, alone and batched over scattered KV blocks.

Where the CPU has AVX-512 VNNI the plan's projections use another exact-to-fp32 arithmetic
than the eager model's (activations as three byte planes, interleaved.h; each kernel is held
to a float64 reference in test_native_kernels.py). These models' weights are N(0, 1), so
their logits reach ~25 and a few fp32 ulps per layer grow to ~1e-5 of that."""
from __future__ import annotations

import pytest

from hayate.kernels import native_kernels
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from kquant_blocks import K_CONFIG, export_mixed_model, q4_k_m_type
from gguf_files import QType, export_hf_model, tiny_model

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
PARAMS = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=5)
PROMPTS = [[3, 17, 5, 60, 21, 8, 44, 9], [7, 7, 1], list(range(10, 47)), [99]]
# A type, or a function of each tensor's GGUF name (a Q4_K_M-like mix of K-quants, Q5_0,
# Q5_1, Q8_0; its q, k and v differ in type, so they run unfused, side by side).
CASES = [("llama", QType.Q4_1, {}), ("qwen2", QType.Q4_0, {}), ("llama", QType.Q8_0, {}),
         ("llama", QType.Q4_1, {"tie_word_embeddings": True}), ("qwen2", q4_k_m_type, K_CONFIG)]


def case_id(case) -> str:
    arch, qtype, overrides = case
    return f"{arch}-{getattr(qtype, 'name', 'Q4_K_M')}-{len(overrides)}"


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def gguf_path(request, tmp_path_factory):
    arch, qtype, overrides = request.param
    path = tmp_path_factory.mktemp("plan") / f"{arch}.gguf"
    if not isinstance(qtype, QType):
        return str(export_mixed_model(path, tiny_model(arch, **overrides), arch, qtype))
    return str(export_hf_model(path, tiny_model(arch, **overrides), arch, qtype))


def planned_and_eager(path: str, **settings) -> tuple[LLM, LLM]:
    planned, eager = LLM(path, **settings), LLM(path, planned_decode=False, **settings)
    assert planned.engine.runner.plan is not None and eager.engine.runner.plan is None
    return planned, eager


def count_runs(llm: LLM) -> list[int]:
    calls = []
    run = llm.engine.runner.plan.run

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return run(*args, **kwargs)

    llm.engine.runner.plan.run = counted
    return calls


def assert_same(ours, theirs, tolerance: float = 1e-3) -> None:
    assert ours.token_ids == theirs.token_ids
    for a, b in zip(ours.logprobs, theirs.logprobs):
        assert abs(a.logprob - b.logprob) < tolerance
        assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_planned_steps_equal_eager_steps(gguf_path):
    planned, eager = planned_and_eager(gguf_path)
    calls = count_runs(planned)
    for prompt in PROMPTS:
        assert_same(planned.generate(prompt, PARAMS), eager.generate(prompt, PARAMS))
    # every decode step was planned, and so was every prompt's prefill (under plan.max_tokens)
    assert len(calls) == len(PROMPTS) * PARAMS.max_tokens
    assert 8 in calls and 3 in calls and 37 in calls   # prefills as rows of one step, or three


def test_batched_over_scattered_blocks(gguf_path):
    """Small blocks, sequences that start and end at different times: each sequence's keys
    come from blocks spread through the cache."""
    planned, eager = planned_and_eager(gguf_path, max_num_seqs=4, block_size=4)
    calls = count_runs(planned)
    for ours, theirs in zip(planned.generate(PROMPTS, PARAMS), eager.generate(PROMPTS, PARAMS)):
        assert_same(ours, theirs)
    assert calls[0] == sum(map(len, PROMPTS))   # every prompt in one planned step (in 4 pieces)
    assert max(calls[1:]) == len(PROMPTS)       # then decode steps of all four


def test_one_token_prefill_chunks_go_through_the_plan(gguf_path):
    """With a one-token budget every prompt token is a plan step that only writes its key
    and value; the answer must not change."""
    planned, eager = planned_and_eager(gguf_path, prefill_chunk=1)
    calls = count_runs(planned)
    assert_same(planned.generate(PROMPTS[0], PARAMS), eager.generate(PROMPTS[0], PARAMS))
    assert len(calls) >= len(PROMPTS[0]) + PARAMS.max_tokens - 2


def test_no_plan_for_fp32_weights(gguf_path):
    assert LLM(gguf_path, weights="fp32").engine.runner.plan is None


def test_bad_steps_are_refused(gguf_path):
    plan = LLM(gguf_path).engine.runner.plan
    with pytest.raises(RuntimeError, match="position out of range"):
        plan.run([1], [100000], [[0]])
    with pytest.raises(RuntimeError, match="token id out of range"):
        plan.run([10 ** 6], [0], [[0]])
    with pytest.raises(RuntimeError, match="block id outside the KV cache"):
        plan.run([1], [0], [[10 ** 8]])
    with pytest.raises(RuntimeError, match="1 to 16 sequences"):
        plan._plan.run([0] * 17, [0] * 17, [[0]] * 17, [0])
    with pytest.raises(RuntimeError, match="logit row out of range"):
        plan.run([0, 0], [0, 0], [[0], [0]], logit_rows=[2])
    with pytest.raises(RuntimeError, match="block table too short"):
        plan.run([1, 1], [0, 40], [[0], [0]])
    too_many = plan.max_tokens + 1
    with pytest.raises(ValueError, match=f"at most {plan.max_tokens} tokens"):
        plan.run([1] * too_many, list(range(too_many)), [list(range(too_many // 4 + 1))] * too_many)


def test_short_prompt_chunks_run_as_rows_of_one_step(gguf_path):
    """Prompts of 16 tokens in all are one planned step whose rows sit at consecutive
    positions of their sequences: each row must see the keys of the rows before it."""
    planned, eager = planned_and_eager(gguf_path, max_num_seqs=3, block_size=4)
    calls = count_runs(planned)
    batch = [list(range(20, 30)), [5, 6, 7, 8, 9], [11]]
    for ours, theirs in zip(planned.generate(batch, PARAMS), eager.generate(batch, PARAMS)):
        assert_same(ours, theirs)
    assert calls[0] == 16   # the three prefills: one planned step of 10 + 5 + 1 rows


def test_a_sequence_gets_the_same_numbers_alone_or_batched(gguf_path):
    """Batch invariance of planned steps: each row's arithmetic is the single row's, bit for
    bit (one-token prompts, so that every step, prefill included, is a planned one)."""
    prompts = [[3], [17], [60], [99]]
    batched = LLM(gguf_path, max_num_seqs=4).generate(prompts, PARAMS)
    alone = LLM(gguf_path, max_num_seqs=1)
    for prompt, together in zip(prompts, batched):
        single = alone.generate(prompt, PARAMS)
        assert single.token_ids == together.token_ids
        assert [lp.logprob for lp in single.logprobs] == [lp.logprob for lp in together.logprobs]


def test_prompts_past_the_planned_size_prefill_eagerly(gguf_path):
    """Past plan.max_tokens a step runs through the eager model (dequantized weights, one
    matmul per layer); its decode steps are planned again."""
    planned, eager = planned_and_eager(gguf_path)
    planned.engine.runner.plan.max_tokens = 40   # the tiny model's context is 256 tokens
    planned.engine.scheduler.planned_prefix = 0
    calls = count_runs(planned)
    prompt = [(7 * i) % 120 + 3 for i in range(44)]
    assert_same(planned.generate(prompt, PARAMS), eager.generate(prompt, PARAMS))
    assert calls == [1] * (PARAMS.max_tokens - 1)


@pytest.mark.parametrize("length, prefill_calls", [(100, [40]), (50, [40, 10]), (70, [40])])
def test_a_long_prompt_starts_planned_and_goes_on_eagerly(gguf_path, length, prefill_calls):
    """A prompt's first plan.max_tokens tokens are a chunk of their own, planned; the rest runs
    planned only while it ends by plan.max_prefill_end (or fits one planned step), else eagerly,
    where flash attention reads each key once for all the chunk's rows. Same answers."""
    planned, eager = planned_and_eager(gguf_path)
    plan = planned.engine.runner.plan
    plan.max_tokens, plan.max_prefill_end = 40, 60
    planned.engine.scheduler.planned_prefix = 40
    calls = count_runs(planned)
    prompt = [(7 * i) % 120 + 3 for i in range(length)]
    assert_same(planned.generate(prompt, PARAMS), eager.generate(prompt, PARAMS))
    assert calls == prefill_calls + [1] * (PARAMS.max_tokens - 1)


def test_prefix_cached_prompts_run_through_the_plan(gguf_path):
    """A prompt whose first blocks are cached prefills only its rest, planned, and gives the
    answer of an uncached run."""
    cached, uncached = LLM(gguf_path), LLM(gguf_path, prefix_caching=False)
    prompt = PROMPTS[2] + PROMPTS[0]                       # 45 tokens: two full blocks of 16
    first = cached.generate(prompt, PARAMS)
    calls = count_runs(cached)
    again = cached.generate(prompt, PARAMS)
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 32)
    assert calls[0] == len(prompt) - 32                    # the prefill ran the uncached rest only
    reference = uncached.generate(prompt, PARAMS)
    assert again.token_ids == first.token_ids == reference.token_ids
    assert [lp.logprob for lp in again.logprobs] == pytest.approx([lp.logprob for lp in reference.logprobs], abs=1e-3)
