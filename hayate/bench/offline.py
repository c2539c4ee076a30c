"""hayate's own single-stream measurements, in this process, and the plan's floor to hold
them against."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from hayate.llm import LLM
from hayate.plan.cost import decode_cost, packed_types, prefill_cost
from hayate.plan.hardware import probe_cpu, probe_jitter
from hayate.plan.dispatch import dispatch_seconds
from hayate.plan.report import predict
from hayate.sampling import SamplingParams

# Prompts are this text's token ids, repeated: natural text keeps attention and the
# tokenizer's usual id range, unlike one token repeated or random ids.
NATURAL_TEXT = (
    "The river ran slowly through the valley, past the old mill and the orchards where the "
    "farmers picked apples every autumn. In the evenings the children walked along the bank, "
    "counting the boats that drifted down towards the town, and their grandparents told them "
    "stories about the winter the water froze so hard that carts could cross it. Nobody quite "
    "believed those stories, but everyone liked to hear them again, because they made the long "
    "dark months feel shorter and the summer seem a little closer than it really was. ")
Progress = Callable[[str], None]
HAYATE = "hayate"


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class BenchPlan:
    """What to run: prompt lengths (already capped to the context) and decode tokens."""
    prompt_lengths: list[int]
    decode_prompt_length: int
    decode_tokens: int
    repeats: int


def plan_lengths(requested: list[int], decode_tokens: int, repeats: int, max_model_len: int,
                 progress: Progress = stderr_progress) -> BenchPlan:
    """Cap the prompt lengths to the context (each needs room for its answer); decode runs
    after the shortest prompt."""
    if decode_tokens < 1 or repeats < 1 or not requested or min(requested) < 1:
        raise ValueError("prompt lengths, --decode-tokens and --repeats must be positive")
    if decode_tokens + 3 > max_model_len:
        raise ValueError(f"--decode-tokens {decode_tokens} does not fit this model's context "
                         f"({max_model_len} tokens)")
    longest = max_model_len - 2
    lengths = sorted({min(length, longest) for length in requested})
    if max(requested) > longest:
        progress(f"bench: prompt lengths capped to the context: at most {longest} tokens")
    decode_prompt = min(lengths[0], max_model_len - decode_tokens - 2)
    return BenchPlan(lengths, decode_prompt, decode_tokens, repeats)


def build_prompt(tokenizer, length: int) -> list[int]:
    """Exactly `length` token ids: BOS (if the model wants one), then the text, repeated."""
    body = tokenizer.encode(NATURAL_TEXT, add_special_tokens=False)
    if not body:   # a vocabulary with none of the text's pieces: repeating nothing never ends
        raise ValueError("the model's tokenizer turns the bench's English text into no tokens")
    wants_bos = tokenizer.add_bos_token and tokenizer.bos_token_id is not None
    ids = [tokenizer.bos_token_id] if wants_bos else []
    while len(ids) < length:
        ids.extend(body)
    return ids[:length]


def time_request(llm: LLM, prompt: list[int], max_tokens: int) -> list[float]:
    """Arrival instant of each generated token, in seconds after the request was submitted."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    times = []
    start = time.perf_counter()
    for output in llm.stream(prompt, params):
        now = time.perf_counter() - start
        times.extend([now] * len(output.token_ids))
    return times


class HayateContender:
    """hayate in this process, as rounds.py's Contender."""
    name = HAYATE

    def __init__(self, llm: LLM, decode_tokens: int, load_s: float):
        self.llm, self.decode_tokens, self.load_s = llm, decode_tokens, load_s

    def accepts(self, prompt_length: int) -> bool:
        return True

    def token_times(self, prompt: list[int], max_tokens: int) -> list[float]:
        return time_request(self.llm, prompt, max_tokens)


@dataclass
class PlanFloor:
    """hayate plan's floor for this model on this machine."""
    hardware: str
    bandwidth_gb_s: float
    matmul_gflops: float
    context: int
    decode_tokens_per_s: float              # the floor
    ttft_ms: dict[int, float]               # the floor
    predicted_decode_tokens_per_s: float | None = None   # hayate plan's prediction
    machine_jitter: float | None = None     # p99/p50 of reading one step's weights, again and again


def plan_floor(llm: LLM, threads: int | None, plan: BenchPlan) -> PlanFloor:
    """Probe this CPU and predict; the decode context is the decode run's mean context."""
    model, config = llm.engine.runner.model, llm.model_config
    hardware = probe_cpu(threads, types=packed_types(model))
    kv_bytes = llm.engine.runner.kv_cache.element_size
    context = plan.decode_prompt_length + plan.decode_tokens // 2
    prediction = predict(model, config, hardware, context, llm.config.prefill_chunk, kv_bytes)
    ttft = {}
    for length in plan.prompt_lengths:
        cost = prefill_cost(model, config, length, llm.config.prefill_chunk, kv_bytes=kv_bytes)
        ttft[length] = hardware.floor_seconds(cost.bytes, cost.flops) * 1e3
    expected = prediction.expected_step_seconds(dispatch_seconds(llm.loaded, context, llm.config.kv_cache_dtype))
    step_bytes = decode_cost(model, config, 1, context, kv_bytes=kv_bytes).bytes
    return PlanFloor(hardware.name, hardware.bandwidth / 1e9, hardware.flops / 1e9, context,
                     prediction.decode_tokens_per_second, ttft, 1 / expected, probe_jitter(step_bytes))
