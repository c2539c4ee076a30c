"""The batched sampler against transformers' logits processors and direct formulas."""
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hayate.layers.sampler import Sampler, SamplingState, process_logits
from hayate.sampling import SamplingParams

VOCAB = 64


def make_state(prompt=(1, 2, 3), output=(), **params):
    state = SamplingState.create(SamplingParams(**params), list(prompt))
    state.output_token_ids.extend(output)
    return state


def random_logits(rows, vocab=VOCAB, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def hf_reference(logits_row, state):
    """Process one row with transformers' processors in our order."""
    params = state.params
    scores = logits_row.unsqueeze(0).clone()
    ids = torch.tensor([state.prompt_token_ids + state.output_token_ids])
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))(ids, scores)
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(ids, scores)
    return scores.squeeze(0)


TWIN_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, min_p=0.1),
    dict(temperature=0.6, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, repetition_penalty=1.3, top_p=0.95),
    dict(temperature=1.1, repetition_penalty=0.8, top_k=10),
]


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_processed_logits_match_transformers_per_row_in_one_batch(scale):
    states = [make_state(prompt=(1, 5, 9, 9), output=(2, 40), **case) for case in TWIN_CASES]
    logits = random_logits(len(states)) * scale
    processed = process_logits(logits, states)
    for row, state in enumerate(states):
        torch.testing.assert_close(processed[row], hf_reference(logits[row], state))


def test_repetition_penalty_applies_to_greedy_rows_too():
    state = make_state(prompt=(0, 1), output=(2,), temperature=0, repetition_penalty=1.5)
    logits = random_logits(1)
    ids = torch.tensor([[0, 1, 2]])
    expected = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone())
    torch.testing.assert_close(process_logits(logits, [state]), expected)


def test_presence_and_frequency_penalties_match_formula():
    output = [3, 3, 3, 7, 9, 9]
    state = make_state(output=output, temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    logits = random_logits(1)
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()
    expected = logits[0] - 0.5 * (counts > 0).float() - 0.25 * counts
    torch.testing.assert_close(process_logits(logits, [state])[0], expected)


def test_logit_bias_is_added_and_out_of_vocab_ids_are_ignored():
    state = make_state(temperature=0, logit_bias={4: 100.0, 5: -100.0, VOCAB + 3: 1.0})
    logits = random_logits(1)
    expected = logits.clone()
    expected[0, 4] += 100.0
    expected[0, 5] -= 100.0
    torch.testing.assert_close(process_logits(logits, [state]), expected)
    assert Sampler()(logits, [state]).token_ids == [4]


def test_caller_logits_are_not_mutated():
    states = [make_state(temperature=0.5, top_k=3, repetition_penalty=1.2, presence_penalty=1.0,
                         output=(1, 2), logit_bias={0: 5.0})]
    logits = random_logits(1)
    before = logits.clone()
    Sampler()(logits, states)
    assert torch.equal(logits, before)


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = random_logits(3)
    logits[2, 10] = logits[2, 20] = logits[2].max() + 1.0
    states = [make_state(temperature=0) for _ in range(3)]
    result = Sampler()(logits, states)
    assert result.token_ids[:2] == logits[:2].argmax(dim=1).tolist()
    assert result.token_ids[2] == 10
    assert all(type(token) is int for token in result.token_ids)


def draw_sequence(state, logits, steps=50, others=0):
    """Draw `steps` tokens for `state` (row 0), optionally alongside unrelated rows."""
    sampler, tokens = Sampler(), []
    for step in range(steps):
        batch = [state] + [make_state(temperature=1.0, seed=1000 + step + i) for i in range(others)]
        tokens.append(sampler(logits[: len(batch)], batch).token_ids[0])
    return tokens


def test_same_seed_same_sequence_and_different_seeds_differ():
    logits = random_logits(4, seed=1) / 3   # flatter, so draws vary
    first = draw_sequence(make_state(seed=42), logits)
    assert first == draw_sequence(make_state(seed=42), logits)
    assert first != draw_sequence(make_state(seed=43), logits)
    assert len(set(first)) > 5


def test_row_draws_do_not_depend_on_batch_mates():
    logits = random_logits(4, seed=2) / 3
    alone = draw_sequence(make_state(seed=7, top_p=0.9), logits)
    batched = draw_sequence(make_state(seed=7, top_p=0.9), logits, others=3)
    assert alone == batched


def test_unseeded_states_are_not_identical():
    logits = random_logits(1, seed=3) / 3
    assert draw_sequence(make_state(), logits) != draw_sequence(make_state(), logits)


@pytest.mark.parametrize("params", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3)])
def test_only_allowed_tokens_are_drawn(params):
    logits = random_logits(1, seed=4) / 2
    state = make_state(seed=5, **params)
    allowed = torch.isfinite(process_logits(logits, [state])[0]).nonzero().flatten().tolist()
    if "top_k" in params:
        assert sorted(allowed) == sorted(logits[0].topk(3).indices.tolist())
    drawn = draw_sequence(state, logits, steps=400)
    assert set(drawn) <= set(allowed)
    assert len(set(drawn)) > 1


def test_draws_follow_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    state = make_state(seed=123, temperature=1.0)
    draws = 4000
    sampler = Sampler()
    tokens = torch.tensor([sampler(logits, [state]).token_ids[0] for _ in range(draws)])
    observed = torch.bincount(tokens, minlength=5).float()
    expected = logits[0].softmax(dim=0) * draws
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 18.5   # 4 degrees of freedom, p = 0.001


def test_temperature_sharpens_the_distribution():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    cold = make_state(seed=9, temperature=0.2)
    sampler = Sampler()
    tokens = [sampler(logits, [cold]).token_ids[0] for _ in range(300)]
    assert tokens.count(0) > 280   # p = e^5 / (e^5 + 3) = 0.98 at T = 0.2, 0.48 at T = 1


def test_logprobs_are_raw_log_softmax_with_sorted_top_ids():
    logits = random_logits(3, seed=6)
    states = [make_state(seed=1, logprobs=5, temperature=0.7, presence_penalty=1.0, output=(1,)),
              make_state(temperature=0, logprobs=2, logit_bias={3: 50.0}),
              make_state(seed=2)]
    result = Sampler()(logits, states)
    raw = logits.log_softmax(dim=1)
    expected = raw.gather(1, torch.tensor(result.token_ids).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(result.logprobs, expected)
    values, ids = result.top_logprobs
    assert values.shape == ids.shape == (3, 5)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    torch.testing.assert_close(values, raw.gather(1, ids))
    assert ids[:, 0].tolist() == logits.argmax(dim=1).tolist()


def test_no_logprobs_when_none_requested():
    result = Sampler()(random_logits(2), [make_state(), make_state(temperature=0)])
    assert result.logprobs is None and result.top_logprobs is None


def test_logprobs_zero_gives_chosen_only():
    result = Sampler()(random_logits(1), [make_state(logprobs=0)])
    assert result.logprobs.shape == (1,)
    assert result.top_logprobs[0].shape == (1, 0)


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logit rows"):
        Sampler()(random_logits(2), [make_state()])


def test_seeds_span_64_bits_and_no_more():
    for seed in (2**64 - 1, -(2**63)):
        assert len(Sampler()(random_logits(1), [make_state(seed=seed)]).token_ids) == 1
    for seed in (2**64, -(2**63) - 1, 2**70 + 5):
        with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
            SamplingParams(seed=seed)
