"""Speculative decoding by prompt lookup (engine/speculative.py, verify.py) against plain
decoding, its slow twin, on a tiny random GGUF model: greedy tokens and text identical alone
and batched, planned and eager, under every stop condition, preemption and prefix caching;
the rejection rule keeps the model's distribution; drafting is exact bookkeeping."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hayate.cli import build_parser, engine_config
from hayate.engine.block_manager import BlockManager
from hayate.engine.scheduler import Scheduler
from hayate.engine.draft_policy import Acceptance, StepCosts
from hayate.engine.speculative import DraftSettings, speculation_for
from hayate.engine.verify import accept_greedy, verify
from hayate.kernels import native_kernels
from hayate.layers.sampler import Sampler, SamplingState
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from gguf_files import QType, export_hf_model, tiny_model
from test_scheduler import FakeRequest
from tiny_models import make_tiny_model

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
# prompts that repeat themselves, so the answers (random models fall into loops) are drafted
PROMPTS = [list(range(20, 36)) * 3, [5, 9, 13, 5, 9, 13, 5, 9], [7] * 6, list(range(40, 90))]
PATHS = ["planned", "eager"]
FREE_ROWS = StepCosts.assumed(16, 0.0)   # rows cost nothing: every step drafts all it can


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """Weights N(0, 0.2^2): answers that fall into loops of a few tokens and leave them, so
    drafts are accepted about a third of the time and rejected the rest."""
    model = tiny_model("llama")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.2)
    return str(export_hf_model(tmp_path_factory.mktemp("spec") / "llama.gguf", model, "llama", QType.Q4_1))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec-hf")
    make_tiny_model("llama", folder)
    return str(folder)


def pair(path: str, step: str, **settings) -> tuple[LLM, LLM]:
    """(plain, speculative) engines on one model, stepping planned or eager."""
    if step == "planned" and native_kernels() is None:
        pytest.skip("no C++ toolchain for the planned step")
    settings = {"planned_decode": step == "planned", **settings}
    plain, speculative = LLM(path, **settings), LLM(path, speculative="ngram", **settings)
    assert (plain.engine.runner.plan is not None) == (step == "planned")
    speculative.engine.scheduler.drafter.costs = FREE_ROWS
    return plain, speculative


def accepted(results) -> int:
    return sum(r.timings.speculative.num_accepted_tokens for r in results)


def assert_all_blocks_free(llm: LLM) -> None:
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.engine.has_unfinished()


@pytest.mark.parametrize("step", PATHS + ["fp32"])
def test_greedy_tokens_equal_plain_decoding_alone_and_batched(gguf_path, hf_folder, step):
    """Planned and eager steps of Q4_1 weights, and the eager model in fp32 (PyTorch's matmuls)."""
    plain, speculative = pair(hf_folder, "eager", max_num_seqs=4) if step == "fp32" else \
        pair(gguf_path, step, max_num_seqs=4)
    expected = [plain.generate(prompt, GREEDY) for prompt in PROMPTS]
    alone = [speculative.generate(prompt, GREEDY) for prompt in PROMPTS]
    batched = speculative.generate(PROMPTS, GREEDY)
    for ours in (alone, batched):
        assert [r.token_ids for r in ours] == [r.token_ids for r in expected]
        assert [r.text for r in ours] == [r.text for r in expected]
    assert accepted(alone) > 0 and accepted(batched) > 0
    assert all(r.timings.speculative.num_draft_steps > 0 for r in alone)
    assert_all_blocks_free(speculative)


@pytest.mark.parametrize("step", PATHS)
def test_stop_conditions_hold_exactly(gguf_path, step):
    """EOS-like stop ids, stop strings, max_tokens and the context end where plain decoding
    ends: tokens drafted past a stop are dropped."""
    plain, speculative = pair(gguf_path, step, max_model_len=80)
    for prompt in PROMPTS[:3]:
        reference = plain.generate(prompt, GREEDY)
        cases = [SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[reference.token_ids[12]]),
                 SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[reference.text[30:36]]),
                 SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
                 SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)]   # to the context's end
        for params in cases:
            ours, theirs = speculative.generate(prompt, params), plain.generate(prompt, params)
            assert (ours.token_ids, ours.text, ours.finish_reason) == (theirs.token_ids, theirs.text, theirs.finish_reason)
    assert_all_blocks_free(speculative)


def test_prefix_cache_holds_no_rejected_tokens(gguf_path):
    """A next turn that starts with a speculative answer reuses its blocks and gets the answer
    a full prefill gives (blocks holding rejected drafts' keys are never registered)."""
    plain, speculative = LLM(gguf_path, prefix_caching=False), LLM(gguf_path, speculative="ngram")
    for prompt in PROMPTS:
        answer = speculative.generate(prompt, GREEDY)
        second_turn = prompt + answer.token_ids + [3, 4, 5]
        again = speculative.generate(second_turn, GREEDY)
        assert again.num_cached_tokens == (len(prompt) + len(answer.token_ids) - 1) // 16 * 16
        assert again.token_ids == plain.generate(second_turn, GREEDY).token_ids
    assert_all_blocks_free(speculative)


@pytest.mark.parametrize("step", PATHS)
def test_preemption_and_a_full_pool_keep_the_tokens(gguf_path, step):
    """A cache of one full context for four drafting requests: drafts take free blocks only,
    give them back when a decode needs them, and preempted requests recompute."""
    settings = dict(max_num_seqs=4, max_model_len=96, kv_cache_tokens=96, block_size=8)
    plain, speculative = pair(gguf_path, step, **settings)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [plain.generate(prompt[:40], params).token_ids for prompt in PROMPTS]
    assert [r.token_ids for r in speculative.generate([p[:40] for p in PROMPTS], params)] == expected
    assert speculative.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(speculative)


def test_seeded_sampling_and_penalties_give_the_plain_tokens(gguf_path):
    """Rows are drawn as plain steps draw them: a seeded request's tokens are the same with and
    without speculation, alone or batched (whatever share of the rows its drafts get)."""
    plain, speculative = pair(gguf_path, "planned", max_num_seqs=4)
    cases = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, repetition_penalty=1.2,
                            frequency_penalty=0.3, logit_bias={7: 2.0}),
             SamplingParams(max_tokens=30, temperature=0.7, top_k=20, seed=7, ignore_eos=True),
             SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=3, presence_penalty=0.5, ignore_eos=True)]
    for params in cases:
        expected = [plain.generate(prompt, params).token_ids for prompt in PROMPTS]
        assert [speculative.generate(prompt, params).token_ids for prompt in PROMPTS] == expected
        assert [r.token_ids for r in speculative.generate(PROMPTS, params)] == expected


def test_who_speculates(gguf_path):
    """Off by default; on per request or per engine; never with logprobs or a grammar."""
    plain, speculative = pair(gguf_path, "planned")
    assert plain.generate(PROMPTS[0], GREEDY).timings.speculative is None
    asked = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, speculative="ngram", speculative_tokens=3)
    assert plain.generate(PROMPTS[0], asked).timings.speculative.num_draft_tokens > 0
    off = SamplingParams(max_tokens=20, temperature=0, speculative="off")
    with_logprobs = SamplingParams(max_tokens=20, temperature=0, logprobs=2)
    assert speculative.generate(PROMPTS[0], off).timings.speculative is None
    assert speculative.generate(PROMPTS[0], with_logprobs).timings.speculative is None
    settings = DraftSettings("ngram", 4, 2)
    assert speculation_for(SamplingParams(speculative_ngram=3), settings).settings == DraftSettings("ngram", 4, 3)
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="medusa")
    with pytest.raises(ValueError, match="speculative_tokens"):
        LLM(gguf_path, speculative="ngram", speculative_tokens=16)


def test_command_line_options():
    parser = build_parser()
    for argv in (["run", "hi"], ["chat"]):
        assert engine_config(parser.parse_args(argv)).speculative is None
        config = engine_config(parser.parse_args(argv + ["--speculative", "ngram", "--speculative-tokens", "4"]))
        assert (config.speculative, config.speculative_tokens, config.speculative_ngram) == ("ngram", 4, 3)
    served = parser.parse_args(["serve", "--speculative", "ngram", "--speculative-ngram", "2"])
    assert (served.speculative, served.speculative_ngram) == ("ngram", 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "hi", "--speculative", "eagle"])


# ---- draft lengths and verification on their own (drafting: test_prompt_lookup.py) ----

def test_draft_length_follows_acceptance_and_row_costs():
    flat, linear = StepCosts.assumed(16, 0.02), StepCosts.assumed(16, 0.5)
    assert flat.best_draft(0.9, 6, decodes=1, rows=1) == 6           # rows nearly free: draft all
    assert linear.best_draft(0.9, 6, decodes=1, rows=1) == 3         # each row half a step: shorter drafts
    assert linear.best_draft(0.3, 6, decodes=1, rows=1) == 0         # rarely accepted: none
    assert linear.best_draft(0.9, 6, decodes=8, rows=8) == 0         # a batch's rows cost everyone
    assert flat.best_draft(0.9, 0, decodes=1, rows=1) == 0
    assert linear.of(20) == pytest.approx(1 + 0.5 * 19)              # past the table: the last increase
    # a draft model's tokens cost a step's fifth each; catching up on a prompt costs 40 steps,
    # worth it over a long answer, not a short one
    assert flat.best_draft(0.9, 6, decodes=1, rows=1, per_token=0.2) == 6
    assert flat.best_draft(0.9, 6, decodes=1, rows=1, per_token=0.2, setup=40, remaining=1000) > 0
    assert flat.best_draft(0.9, 6, decodes=1, rows=1, per_token=0.2, setup=40, remaining=50) == 0
    measured = StepCosts.measure(lambda rows: None, 4, repeats=1)
    assert measured.seconds == sorted(measured.seconds)              # made monotone


def test_acceptance_fades_back_to_the_prior():
    acceptance = Acceptance()
    assert acceptance.rate == 0.8
    acceptance.record(6, 6)
    acceptance.record(6, 0)
    acceptance.record(6, 1)
    assert acceptance.rate == pytest.approx(7.8 / 10)
    for _ in range(5000):
        acceptance.step()
    assert acceptance.rate == pytest.approx(0.8, abs=1e-3)


def test_drafts_take_spare_rows_and_free_blocks_only():
    scheduler = Scheduler(BlockManager(7, 4), max_num_seqs=3, token_budget=64, step_tokens=16)
    scheduler.drafter = lambda request, room, decodes, rows: [0] * room
    a, b, c = requests = [FakeRequest(name, 5) for name in "abc"]
    for request in requests:
        scheduler.add(request)
    scheduler.schedule()                              # prefills: 2 blocks each, 1 left free
    for request in requests:
        request.num_computed_tokens, request.num_tokens = 5, 6
    out = scheduler.schedule()
    # 13 spare rows, shared; a takes the free block for 4 drafts, b and c fill their own tables
    assert [s.num_tokens for s in out.sequences] == [5, 3, 3]
    assert scheduler.blocks.num_free_blocks == 0 and len(a.block_table) == 3
    # a's drafts were rejected, b's accepted: b needs a block, and a's spare one comes back
    a.num_computed_tokens, a.num_tokens = 6, 7
    b.num_computed_tokens, b.num_tokens = 8, 9
    c.num_computed_tokens, c.num_tokens = 6, 7
    scheduler.drafter = lambda request, room, decodes, rows: []
    scheduler.schedule()
    assert scheduler.num_preemptions == 0 and (len(a.block_table), len(b.block_table)) == (2, 3)


def test_greedy_acceptance():
    assert accept_greedy([4, 5, 6], [4, 5, 7, 9]) == [4, 5, 7]
    assert accept_greedy([4, 5, 6], [4, 5, 6, 9]) == [4, 5, 6, 9]
    assert accept_greedy([4], [3, 9]) == [3]


def test_sampled_rows_draw_as_plain_steps_would():
    """Verification draws each row from the request's generator as a plain step does, and
    no row past a rejection: the generator ends where plain sampling of the same tokens
    leaves it, and a draft is accepted exactly when it is the row's draw."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 2
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=11)
    plain = SamplingState.create(params, [1, 2])
    expected = []
    for row in range(4):
        expected += Sampler()(logits[row:row + 1], [plain]).token_ids
        plain.output_token_ids.append(expected[-1])
    for wrong in range(3):   # drafts right up to row `wrong`, then a token that is not the draw
        draft = expected[:wrong] + [(expected[wrong] + 1) % 50] + expected[wrong + 1:3]
        state = SamplingState.create(params, [1, 2])
        assert verify(logits, draft, state) == expected[:wrong + 1]
        replay = SamplingState.create(params, [1, 2])
        for row in range(wrong + 1):
            Sampler()(logits[row:row + 1], [replay])
        assert torch.equal(state.generator.get_state(), replay.generator.get_state())
    assert verify(logits, expected[:3], SamplingState.create(params, [1, 2])) == expected


def test_rejection_rule_keeps_the_models_distribution():
    """Over many seeds, a draft is accepted with its probability under the row's processed
    distribution, and the first token follows that distribution."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8) * 1.5
    params = SamplingParams(temperature=0.8, top_k=6)
    draft, trials = [int(logits[0].argmax())], 3000
    firsts = torch.zeros(8)
    for seed in range(trials):
        firsts[verify(logits, draft, SamplingState.create(replace(params, seed=seed), [1]))[0]] += 1
    expected = _processed(logits[0], params)
    assert (firsts / trials - expected).abs().max() < 0.03
    assert firsts[expected == 0].sum() == 0


def _processed(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = row / params.temperature
    kth = scaled.topk(params.top_k).values[-1]
    return scaled.masked_fill(scaled < kth, float("-inf")).softmax(dim=0)


def test_served_usage_and_metrics_count_the_drafts(gguf_path):
    """Over HTTP: a request asks for speculation; usage.completion_tokens_details carries its
    accepted and rejected drafts (OpenAI's prediction fields) and /metrics counts them (vLLM's
    names); a bad value is a 400 naming the field."""
    import httpx
    from hayate.server import ServedModel, ServerSettings, create_app
    from server_harness import ServerThread

    def load() -> ServedModel:
        llm = LLM(gguf_path, speculative="ngram")
        llm.engine.scheduler.drafter.costs = FREE_ROWS
        return ServedModel.from_llm(llm, max_queue=4)

    server = ServerThread(create_app(ServerSettings(), load, hardware=None)).start()
    try:
        body = {"model": server.state.model.name, "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0,
                "ignore_eos": True}
        usage = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["usage"]
        details = usage["completion_tokens_details"]
        drafted = details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"]
        assert drafted > 0 and details["accepted_prediction_tokens"] >= 0
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f"hayate_spec_decode_num_draft_tokens_total {float(drafted)}" in metrics
        off = httpx.post(f"{server.url}/v1/completions", json={**body, "speculative": "off"}, timeout=60).json()
        assert "completion_tokens_details" not in off["usage"]
        bad = httpx.post(f"{server.url}/v1/completions", json={**body, "speculative": "medusa"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    finally:
        server.stop()
