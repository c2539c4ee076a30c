"""Batched sampler: logit bias, penalties, temperature, top-k/top-p/min-p, then a draw.

Each row is sampled with its own torch.Generator (exponential race: argmax(probs / q),
q ~ Exp(1) from that row's generator), so a seeded request gives the same tokens whatever
else shares the batch. Reported logprobs are the log-softmax of the raw model logits,
before bias, penalties and temperature (vLLM's default); top alternatives come from the
same distribution. A constrained row's logits arrive here already masked by its grammar
(disallowed tokens -inf, structured/masks.py), so its logprobs are those of the masked
distribution: renormalised over the tokens the grammar allows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hayate.kernels import native_kernels
from hayate.sampling import SamplingParams

SEED_MODULUS = 2**64   # torch generators take seeds in [0, 2**64)


@dataclass
class SamplingState:
    """One request's sampling inputs, kept by the engine between steps."""
    params: SamplingParams
    generator: torch.Generator
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    constraint: object | None = None   # a structured.GrammarMatcher: the runner masks this row's logits
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: list[int],
               device: torch.device | str = "cpu") -> "SamplingState":
        """Seed from params.seed, or from fresh OS entropy when it is None.

        Pass the device the logits live on, so the random draws stay there.
        """
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed % SEED_MODULUS)
        return cls(params, generator, list(prompt_token_ids), [])

    def extended(self, token_ids: list[int]) -> "SamplingState":
        """This state as if token_ids followed the output (a drafted row is sampled as the step
        that would have produced it: penalties count the drafts before it); the same generator."""
        state = SamplingState(self.params, self.generator, self.prompt_token_ids, self.output_token_ids + token_ids,
                              self.constraint)
        state._prompt_ids = self._prompt_ids
        return state

    def prompt_ids(self, device: torch.device) -> torch.Tensor:
        """The prompt ids as a tensor on `device`, built once (prompts can be long)."""
        if self._prompt_ids is None or self._prompt_ids.device != device:
            self._prompt_ids = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
        return self._prompt_ids


@dataclass
class SampleResult:
    token_ids: list[int]                     # one per row
    logprobs: torch.Tensor | None            # [batch] raw log-softmax of the chosen token
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # ([batch, k] values, [batch, k] ids)


def _row_values(states: list[SamplingState], name: str, device: torch.device) -> torch.Tensor:
    """[batch, 1] float32 tensor of one SamplingParams field across the batch."""
    values = [float(getattr(state.params, name)) for state in states]
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _row_id_pairs(id_lists: list[torch.Tensor], rows: list[int],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row id tensors into (row index, token id) pairs for index_put_."""
    if not id_lists:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    lengths = torch.tensor([len(ids) for ids in id_lists], device=device)
    row_index = torch.repeat_interleave(torch.tensor(rows, device=device), lengths)
    return row_index, torch.cat(id_lists)


def apply_logit_bias(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Add each row's OpenAI logit_bias in place; ids beyond the vocabulary are ignored."""
    entries = [(row, token_id, bias) for row, state in enumerate(states)
               for token_id, bias in state.params.logit_bias.items() if token_id < logits.shape[1]]
    if entries:
        rows, ids, biases = zip(*entries)
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits.index_put_(index, torch.tensor(biases, device=logits.device), accumulate=True)


def apply_repetition_penalty(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """HF/CTRL penalty in place over prompt + output ids: divide positive logits, multiply negative."""
    device = logits.device
    rows = [row for row, state in enumerate(states) if state.params.repetition_penalty != 1.0]
    if not rows:
        return
    id_lists = []
    for row in rows:
        output_ids = torch.tensor(states[row].output_token_ids, dtype=torch.long, device=device)
        id_lists.append(torch.cat([states[row].prompt_ids(device), output_ids]))
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.index_put_(_row_id_pairs(id_lists, rows, device), torch.tensor(True, device=device))
    penalty = _row_values(states, "repetition_penalty", device)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits.copy_(torch.where(seen, penalised, logits))


def apply_presence_frequency(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """OpenAI penalties in place over output ids: logit - presence*(count>0) - frequency*count."""
    device = logits.device
    rows = [row for row, state in enumerate(states)
            if state.params.presence_penalty != 0.0 or state.params.frequency_penalty != 0.0]
    if not rows:
        return
    id_lists = [torch.tensor(states[row].output_token_ids, dtype=torch.long, device=device)
                for row in rows]
    counts = torch.zeros_like(logits)
    counts.index_put_(_row_id_pairs(id_lists, rows, device),
                      torch.tensor(1.0, device=device), accumulate=True)
    presence = _row_values(states, "presence_penalty", device)
    frequency = _row_values(states, "frequency_penalty", device)
    logits -= presence * (counts > 0) + frequency * counts


def _top_k_top_p(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Mask by top-k (ties with the k-th kept) then top-p (at least one kept), as HF does."""
    vocab = logits.shape[1]
    sorted_logits, sorted_ids = torch.sort(logits, dim=1)   # ascending, as HF's top-p
    top_k = [min(state.params.top_k, vocab) if state.params.top_k > 0 else vocab for state in states]
    kth_index = vocab - torch.tensor(top_k, device=logits.device).unsqueeze(1)
    kth_value = sorted_logits.gather(1, kth_index)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    top_p = _row_values(states, "top_p", logits.device)
    cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)
    remove = (cumulative <= 1 - top_p) & (top_p < 1)
    remove[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _min_p(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    probs = logits.softmax(dim=1)
    threshold = _row_values(states, "min_p", logits.device) * probs.amax(dim=1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def warp_logits(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for sampled rows; filtered tokens become -inf."""
    logits = logits / _row_values(states, "temperature", logits.device)
    if any(state.params.top_k > 0 or state.params.top_p < 1.0 for state in states):
        logits = _top_k_top_p(logits, states)
    if any(state.params.min_p > 0.0 for state in states):
        logits = _min_p(logits, states)
    return logits


def process_logits(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """The logits each row is drawn from. Greedy rows get bias and penalties only.

    Returns a float32 [batch, vocab] tensor; the caller's logits are untouched (returned
    as they are when no row changes them: greedy rows without bias or penalties).
    """
    if logits.dtype == torch.float32 and all(_unchanged(state.params) for state in states):
        return logits
    processed = logits.to(torch.float32, copy=True)
    apply_logit_bias(processed, states)
    apply_repetition_penalty(processed, states)
    apply_presence_frequency(processed, states)
    sampled_rows = [row for row, state in enumerate(states) if not state.params.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        processed[index] = warp_logits(processed[index], [states[row] for row in sampled_rows])
    return processed


def _exponential_noise(states: list[SamplingState], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] Exp(1) draws, each row from its own request's generator."""
    rows = []
    for state in states:
        noise = torch.empty(vocab, device=state.generator.device)
        rows.append(noise.exponential_(generator=state.generator).to(device))
    return torch.stack(rows)


def _unchanged(params) -> bool:
    return (params.greedy and not params.logit_bias and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0)


def _greedy_alone(params) -> bool:
    """Greedy, nothing changes the logits, no logprobs: the token is the logits' argmax."""
    return _unchanged(params) and params.logprobs is None


def _argmax_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (ties and NaN: the first), int64. On the CPU through numpy: ~5 us
    for a 49k vocabulary where torch's reduction takes ~50 (1.5% of a decode step)."""
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return torch.from_numpy(values.numpy().argmax(axis=1).astype(np.int64))
    return values.argmax(dim=1)


def argmax_list(logits: torch.Tensor) -> list[int]:
    """Each row's argmax as ints: natively for CPU float32 logits (one short call), else
    through _argmax_rows."""
    kernels = native_kernels() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    return kernels.argmax_rows(logits) if kernels is not None else _argmax_rows(logits).tolist()


def draw_tokens(processed: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Pick one token per row: argmax for greedy rows (ties -> lowest id), a draw otherwise."""
    token_ids = _argmax_rows(processed)
    sampled_rows = [row for row, state in enumerate(states) if not state.params.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=processed.device)
        probs = processed[index].softmax(dim=1)
        noise = _exponential_noise([states[row] for row in sampled_rows], processed.shape[1],
                                   processed.device)
        # a zero draw would make 0/0 on a filtered token; probs of 0 must never win
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        token_ids[index] = (probs / noise).argmax(dim=1)
    return token_ids


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Chosen-token logprobs [batch] and the top `num_top` ([batch, k] values, ids), descending."""
    logprobs = logits.to(torch.float32).log_softmax(dim=1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_values, top_ids = logprobs.topk(min(num_top, logprobs.shape[1]), dim=1)
    return chosen, (top_values, top_ids)


class Sampler:
    """Turns one step's logits [batch, vocab] into one token per request."""

    @staticmethod
    def argmax_only(states: list[SamplingState]) -> bool:
        """Every row greedy with nothing changing its logits and no logprobs: the tokens are
        the argmax, and no PyTorch operator runs."""
        return all(_greedy_alone(state.params) for state in states)

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        if logits.shape[0] != len(states):
            raise ValueError(f"got {logits.shape[0]} logit rows for {len(states)} requests")
        if self.argmax_only(states):   # the usual decode step
            return SampleResult(argmax_list(logits), None, None)
        token_ids = draw_tokens(process_logits(logits, states), states)
        requested = [state.params.logprobs for state in states if state.params.logprobs is not None]
        if not requested:
            return SampleResult(token_ids.tolist(), None, None)
        chosen, top = gather_logprobs(logits, token_ids, max(requested))
        return SampleResult(token_ids.tolist(), chosen, top)
