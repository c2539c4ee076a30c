"""Raw timings of one engine (the same shape for hayate and every peer) and the figures
they give: time to first token per prompt length, decode tokens/s, inter-token latency."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RawTimings:
    """What an engine measured; every instant is seconds after its request was submitted."""
    ttft_s: dict[int, list[float]]          # prompt length -> one time to first token per repeat
    decode_token_times_s: list[list[float]]  # per repeat: arrival of each token (first = prefill's)
    decode_prompt_length: int
    load_s: float | None = None

    @classmethod
    def from_json(cls, data: dict) -> "RawTimings":
        """Parse a worker's JSON; raises ValueError when a field is missing or malformed."""
        try:
            ttft = {int(length): [float(s) for s in values] for length, values in data["ttft_s"].items()}
            runs = [[float(t) for t in run] for run in data["decode_token_times_s"]]
            load = data.get("load_s")
            return cls(ttft, runs, int(data["decode_prompt_length"]), None if load is None else float(load))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"malformed timings ({type(error).__name__}: {error})") from None


@dataclass
class EngineResult:
    """One engine's figures (medians over the repeats), or why there are none."""
    name: str
    status: str = "ok"                      # "ok" | "failed" | "skipped"
    error: str | None = None
    ttft_ms: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: float | None = None
    itl_ms: dict[str, float] = field(default_factory=dict)   # "p50", "p90", "p99"
    itl_samples_ms: list[float] = field(default_factory=list)
    # Each round's figure, in round order (rounds.py): ratios of the same round pair engines
    # that ran back to back, on the same phase of the machine.
    ttft_rounds_ms: dict[int, list[float]] = field(default_factory=dict)
    decode_rounds_tokens_per_s: list[float] = field(default_factory=list)
    decode_prompt_length: int | None = None
    load_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def decode_tokens(self) -> int:
        """Tokens decoded after the first (one inter-token gap each)."""
        return len(self.itl_samples_ms)

    @property
    def itl_p99_over_p50(self) -> float | None:
        p50, p99 = self.itl_ms.get("p50"), self.itl_ms.get("p99")
        return p99 / p50 if p50 and p99 is not None else None


def failed(name: str, message: str, status: str = "failed") -> EngineResult:
    return EngineResult(name, status=status, error=message)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def inter_token_gaps(token_times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(token_times, token_times[1:])]


def decode_rate(token_times: list[float]) -> float:
    """Tokens per second after the first token (the first is the prefill's)."""
    return (len(token_times) - 1) / max(token_times[-1] - token_times[0], 1e-9)


def summarize(name: str, raw: RawTimings) -> EngineResult:
    """Medians over the repeats; the ITL distribution is the repeat with the median rate."""
    result = EngineResult(name, decode_prompt_length=raw.decode_prompt_length, load_s=raw.load_s)
    result.ttft_rounds_ms = {length: [s * 1e3 for s in values] for length, values in sorted(raw.ttft_s.items())
                             if values}
    result.ttft_ms = {length: statistics.median(values) for length, values in result.ttft_rounds_ms.items()}
    runs = [run for run in raw.decode_token_times_s if len(run) >= 2]
    result.decode_rounds_tokens_per_s = [decode_rate(run) for run in runs]
    if runs:
        by_rate = sorted(runs, key=decode_rate)
        median_run = by_rate[(len(by_rate) - 1) // 2]
        result.decode_tokens_per_s = statistics.median(result.decode_rounds_tokens_per_s)
        result.itl_samples_ms = [gap * 1e3 for gap in inter_token_gaps(median_run)]
        result.itl_ms = {f"p{q}": percentile(result.itl_samples_ms, q) for q in PERCENTILES}
    return result
