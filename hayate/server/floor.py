"""The plan's floor for the served model on this machine, and how close each request came to it.

`hayate plan` computes the floor (hayate.plan.report.predict); the server asks it once, after
the model has loaded, and keeps the answer as a few numbers: the floor of a batch-1 decode step
at the shortest and the longest context (a step's bytes grow linearly with its context), and
the floor of prefill at the plan's prompt lengths. A request's share of the floor is then the
floor's seconds over the seconds it took (1 = at the floor): a few multiplications."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from hayate.engine.engine import Engine
from hayate.engine.request import RequestOutput
from hayate.plan.hardware import HardwareProfile, datasheet_profiles, probe_cpu
from hayate.plan.report import predict
from hayate.server.responses import FloorShare

REFERENCE_CONTEXT = 512   # hayate plan's default --context: where the floor gauges quote decode
REFERENCE_PROMPT = 512    # ... and the prompt length where they quote prefill


@dataclass(frozen=True)
class LiveFloor:
    """The floor of the served model on this machine, at any context or prompt length."""
    hardware: str
    max_context: int
    decode_step_seconds: tuple[float, float]        # a batch-1 step's floor at context 1 and max_context
    prefill_seconds: tuple[tuple[int, float], ...]  # (prompt tokens, floor seconds), shortest first

    def decode_seconds(self, context: float) -> float:
        """Floor of one decode step at `context` cached tokens: the line through the two ends
        (exact while bytes, not FLOPs, bound the step, as they do at batch 1)."""
        shortest, longest = self.decode_step_seconds
        position = (max(context, 1) - 1) / max(self.max_context - 1, 1)
        return shortest + (longest - shortest) * position

    def prompt_seconds(self, num_tokens: int) -> float:
        """Floor of prefilling `num_tokens`: piecewise linear through the plan's prompt lengths
        from (0, 0), its last piece extended past the longest."""
        points = ((0, 0.0), *self.prefill_seconds)
        pieces = list(itertools.pairwise(points))
        (start, start_s), (end, end_s) = next((p for p in pieces if num_tokens <= p[1][0]), pieces[-1])
        return start_s + (end_s - start_s) * (num_tokens - start) / (end - start)

    def decode_tokens_per_second(self, context: float = REFERENCE_CONTEXT) -> float:
        return 1 / self.decode_seconds(context)

    def prefill_tokens_per_second(self, num_tokens: int = REFERENCE_PROMPT) -> float:
        return num_tokens / self.prompt_seconds(num_tokens)

    def decode_share(self, output: RequestOutput) -> float | None:
        """The floor's seconds for a finished request's decode steps (every token after the
        first, at the request's mean context) over the seconds they took."""
        timings, steps = output.timings, output.num_output_tokens - 1
        if steps < 1 or timings.first_token is None or timings.finished is None:
            return None
        taken = timings.finished - timings.first_token
        context = output.num_prompt_tokens + output.num_output_tokens / 2
        return steps * self.decode_seconds(context) / taken if taken > 0 else None

    def prefill_share(self, output: RequestOutput) -> float | None:
        """The floor's seconds for prefilling the prompt tokens the prefix cache lacked, over
        the seconds from the first scheduled step to the first token (images' encoding included)."""
        timings = output.timings
        computed = output.num_prompt_tokens - output.num_cached_tokens
        if computed < 1 or timings.first_token is None or timings.first_scheduled is None:
            return None
        taken = timings.first_token - timings.first_scheduled
        return self.prompt_seconds(computed) / taken if taken > 0 else None


def measure_floor(engine: Engine, hardware: HardwareProfile) -> LiveFloor:
    """The plan's floor for the model `engine` runs, with its KV cache and prefill chunk."""
    model, runner = engine.runner.model, engine.runner
    chunk, longest = engine.scheduler.token_budget, engine.max_model_len
    shortest_plan = predict(model, model.config, hardware, 1, chunk, runner.kv_cache.element_size)
    longest_plan = predict(model, model.config, hardware, longest, chunk, runner.kv_cache.element_size)
    return LiveFloor(hardware.name, longest, (shortest_plan.decode_step_seconds, longest_plan.decode_step_seconds),
                     tuple(sorted(shortest_plan.time_to_first_token.items())))


def machine_hardware(device: torch.device) -> HardwareProfile | None:
    """This machine as `hayate plan` sees it: the CPU probed (a second or so: read bandwidth and
    the matmul rate), a GPU by its datasheet; None for a GPU the datasheets lack."""
    if device.type == "cpu":
        return probe_cpu(types=())   # the kernels' per-type rates feed the prediction, not the floor
    if device.type == "cuda":
        return datasheet_for(torch.cuda.get_device_name(device))
    return None


def datasheet_for(device_name: str) -> HardwareProfile | None:
    """The datasheet profile whose key is a word of the name, or two words run together:
    "NVIDIA GeForce RTX 4090" is rtx4090, "NVIDIA L40S" is not l4."""
    words = re.split(r"[\s\-_]+", device_name.lower())
    names = set(words) | {first + second for first, second in itertools.pairwise(words)}
    return next((profile for key, profile in datasheet_profiles().items() if key in names), None)


def floor_share(floor: LiveFloor | None, outputs: list[RequestOutput]) -> FloorShare | None:
    """usage.floor_share of one API request: its choices' shares, averaged; None until the
    floor is known."""
    if floor is None or not outputs:
        return None
    return FloorShare(decode=_mean([floor.decode_share(output) for output in outputs]),
                      prefill=_mean([floor.prefill_share(output) for output in outputs]))


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None
