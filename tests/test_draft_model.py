"""Speculative decoding with a draft model (engine/draft_model.py) against plain decoding on
tiny random GGUF models: greedy and seeded sampled answers identical, alone and batched, with
a draft that always agrees (the target's own file) and one that rarely does; the draft's
cache blocks given back; clear errors for a draft that cannot serve."""
from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

from hayate.cli import speculative_method, speculative_settings
from hayate.config import EngineConfig
from hayate.kernels import native_kernels
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from gguf_files import QType, export_hf_model, tiny_model
from test_speculative import FREE_ROWS, GREEDY, PROMPTS


def export(path, scale: float, **overrides) -> str:
    model = tiny_model("llama", **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return str(export_hf_model(path, model, "llama", QType.Q8_0))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("draft")
    return {"target": export(folder / "target.gguf", 0.2),
            "other": export(folder / "other.gguf", 0.3, num_hidden_layers=1),
            "wide": export(folder / "wide.gguf", 0.2, vocab_size=tiny_model("llama").config.vocab_size + 64)}


def drafting(path: str, draft: str, **settings) -> LLM:
    """An engine whose sequences draft all they may (free rows, free draft steps)."""
    llm = LLM(path, speculative="draft", speculative_model=draft, **settings)
    assert llm.engine.draft is not None
    llm.engine.scheduler.drafter.costs = FREE_ROWS
    llm.engine.draft.step_seconds = llm.engine.draft.catch_up_seconds = 0.0
    return llm


@pytest.mark.parametrize("draft, planned", [("target", True), ("other", True), ("other", False)])
def test_answers_equal_plain_decoding(files, draft, planned):
    """Both models planned, or both eager (the draft's steps through the eager model)."""
    if planned and native_kernels() is None:
        pytest.skip("no C++ toolchain for the planned step")
    plain = LLM(files["target"], planned_decode=planned)
    speculative = drafting(files["target"], files[draft], planned_decode=planned)
    assert (speculative.engine.draft.runner.plan is not None) == planned
    alone = [speculative.generate(prompt, GREEDY) for prompt in PROMPTS]
    batched = speculative.generate(PROMPTS, GREEDY)
    expected = [result.token_ids for result in plain.generate(PROMPTS, GREEDY)]
    assert [r.token_ids for r in alone] == expected and [r.token_ids for r in batched] == expected
    counts = [r.timings.speculative for r in alone]
    assert sum(c.num_draft_tokens for c in counts) > 0
    accepted = sum(c.num_accepted_tokens for c in counts) / sum(c.num_draft_tokens for c in counts)
    assert accepted == 1.0 if draft == "target" else accepted < 0.9   # its own file always agrees
    sampled = SamplingParams(max_tokens=30, temperature=0.9, seed=3, ignore_eos=True)
    assert speculative.generate(PROMPTS[1], sampled).token_ids == plain.generate(PROMPTS[1], sampled).token_ids
    draft_model = speculative.engine.draft
    assert draft_model.blocks.num_free_blocks == draft_model.blocks.num_blocks   # every sequence's given back


def test_a_request_may_turn_it_off_or_use_prompt_lookup(files):
    speculative = drafting(files["target"], files["target"])
    plain = LLM(files["target"]).generate(PROMPTS[0], GREEDY).token_ids
    for method, counted in (("off", False), ("ngram", True)):
        result = speculative.generate(PROMPTS[0], replace(GREEDY, speculative=method))
        assert result.token_ids == plain and (result.timings.speculative is not None) == counted


def test_drafts_that_cannot_serve_are_refused(files):
    with pytest.raises(ValueError, match="share the target's vocabulary"):
        LLM(files["target"], speculative="draft", speculative_model=files["wide"])
    with pytest.raises(ValueError, match="needs a draft model"):
        LLM(files["target"]).generate([1, 2], SamplingParams(max_tokens=2, speculative="draft"))
    with pytest.raises(ValueError, match="go together"):
        EngineConfig(speculative="draft")
    with pytest.raises(ValueError, match="go together"):
        EngineConfig(speculative="ngram", speculative_model="small.gguf")


def test_cli_spells_the_draft_model_after_draft():
    assert speculative_method("draft:qwen2.5-coder:0.5b") == "draft:qwen2.5-coder:0.5b"
    for bad in ("draft:", "draft", "medusa"):
        with pytest.raises(argparse.ArgumentTypeError):
            speculative_method(bad)
    args = argparse.Namespace(speculative="draft:qwen2.5-coder:0.5b", speculative_tokens=4, speculative_ngram=3)
    assert speculative_settings(args) == {"speculative": "draft", "speculative_model": "qwen2.5-coder:0.5b",
                                          "speculative_tokens": 4, "speculative_ngram": 3}
    args.speculative = None
    assert speculative_settings(args)["speculative"] is None and speculative_settings(args)["speculative_model"] is None


def test_a_failing_draft_model_leaves_the_request_to_plain_decoding(files, monkeypatch):
    speculative = drafting(files["target"], files["other"])
    expected = LLM(files["target"]).generate(PROMPTS[0], GREEDY).token_ids

    def broken(*args):
        raise RuntimeError("draft model out of order")

    monkeypatch.setattr(speculative.engine.draft.runner, "execute", broken)
    result = speculative.generate(PROMPTS[0], GREEDY)
    assert result.token_ids == expected and result.timings.speculative.num_draft_tokens == 0
