"""The fixed-shape decode step that CUDA captures as graphs (hayate/engine/static_decode.py),
run here without the capture against its slow twin, the dynamic eager step: the same
greedy tokens and logprobs, alone and batched (padding sequences in a bucket), across
key-width buckets, with padding confined to the scratch block."""
from __future__ import annotations

import pytest
import torch

from hayate.engine import model_runner, static_decode
from hayate.engine.static_decode import StaticStep, buckets
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from test_decode_plan import PROMPTS, assert_same
from tiny_models import make_tiny_model

PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("static")
    make_tiny_model("llama", folder)
    return str(folder)


@pytest.fixture
def static_everywhere(monkeypatch):
    """Static steps on the CPU too (uncaptured), with key-width buckets of 16, 32, 64 ..."""
    monkeypatch.setattr(model_runner, "graphs_available", lambda device: True)
    monkeypatch.setattr(static_decode, "MIN_WIDTH", 16)


def count_static_runs(llm: LLM) -> list[int]:
    calls = []
    run = llm.engine.runner.static.run

    def counted(token_ids, positions, tables):
        calls.append(len(token_ids))
        return run(token_ids, positions, tables)

    llm.engine.runner.static.run = counted
    return calls


def test_buckets():
    assert buckets(1, 1) == [1]
    assert buckets(6, 1) == [1, 2, 4, 6]
    assert buckets(8, 1) == [1, 2, 4, 8]
    assert buckets(4096, 256, 16) == [256, 512, 1024, 2048, 4096]
    assert buckets(100, 256, 16) == [112]          # the context, rounded up to whole blocks
    assert buckets(600, 24, 16) == [32, 64, 128, 256, 512, 608]


def test_static_steps_equal_eager_steps(folder, static_everywhere):
    static = LLM(folder, max_model_len=128, max_num_seqs=4, prefix_caching=False)
    eager = LLM(folder, max_model_len=128, max_num_seqs=4, prefix_caching=False, cuda_graphs=False)
    assert static.engine.runner.static is not None and eager.engine.runner.static is None
    assert sorted(static.engine.runner.static.steps) == [(b, w) for b in (1, 2, 4) for w in (16, 32, 64, 128)]
    calls = count_static_runs(static)
    for prompt in PROMPTS:   # alone: 40 decodes through widths 16 .. 128 (the longest prompt has 37 tokens)
        assert_same(static.generate(prompt, PARAMS), eager.generate(prompt, PARAMS), tolerance=1e-4)
    # Every decode, and a one-token prompt's own step, ran static.
    assert len(calls) == sum(PARAMS.max_tokens - 1 + (len(p) == 1) for p in PROMPTS) and set(calls) == {1}
    calls.clear()
    # Three at once: a bucket of four with one padding sequence, then two, then one as they end.
    ours, theirs = (together(llm, PROMPTS[:3], (30, 12, 5)) for llm in (static, eager))
    for a, b in zip(ours, theirs):
        assert_same(a, b, tolerance=1e-4)
    assert {3, 2, 1} <= set(calls)


def together(llm: LLM, prompts: list[list[int]], max_tokens: tuple[int, ...]):
    """The prompts run at once, each stopping after its own number of tokens."""
    ids = [llm._submit(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=5))
           for prompt, n in zip(prompts, max_tokens)]
    return llm._collect(ids)


def test_prompts_and_long_contexts_run_eagerly(folder, static_everywhere, monkeypatch):
    llm = LLM(folder, max_model_len=128, max_num_seqs=2, prefix_caching=False)
    calls = count_static_runs(llm)
    llm.generate(PROMPTS[2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert calls == [1, 1]   # the 37-token prompt ran eagerly; the first token comes from it
    assert not llm.engine.runner.static.fits(3, 10) and not llm.engine.runner.static.fits(1, 129)


def test_padding_touches_only_the_scratch_block(folder, static_everywhere):
    llm = LLM(folder, max_model_len=64, max_num_seqs=4, prefix_caching=False)
    runner = llm.engine.runner
    storage = runner.kv_cache.storage
    block_size, scratch = runner.kv_cache.block_size, runner.kv_cache.num_blocks - 1
    storage.zero_()
    step: StaticStep = runner.static.steps[4, 32]
    table = [5, 2]   # a scattered table: the token at position 20 goes to block 2, row 4
    with torch.inference_mode():
        logits = step.run([42], [20], [table])
    assert logits.shape == (1, llm.model_config.vocab_size)
    written = storage.abs().sum(dim=(0, 1, 3, 4)).nonzero().flatten().tolist()   # rows holding anything
    assert written == [2 * block_size + 4, scratch * block_size]


def test_graphs_are_off_on_the_cpu_and_by_setting(folder):
    assert LLM(folder, dtype="bfloat16").engine.runner.static is None         # no CUDA here
    assert not model_runner.graphs_available(torch.device("cpu"))


@pytest.mark.parametrize("command", [["run", "hi"], ["chat"], ["serve"]])
def test_enforce_eager_turns_the_graphs_off(command):
    from hayate.cli import build_parser, engine_config

    args = build_parser().parse_args([command[0], "--enforce-eager", *command[1:]])
    assert args.enforce_eager and not build_parser().parse_args(command).enforce_eager
    if command[0] == "run":
        assert engine_config(args).cuda_graphs is False
