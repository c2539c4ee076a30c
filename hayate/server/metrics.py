"""Prometheus metrics for GET /metrics, in a registry of the app's own (tests and embedders can
run several apps in one process without their counters mixing), and the live share of the
plan's floor (hayate.server.floor) once it is measured after start-up."""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from hayate.engine.request import EngineStats, RequestOutput
from hayate.server.floor import REFERENCE_CONTEXT, REFERENCE_PROMPT, LiveFloor

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                      0.3, 0.5, 0.75, 1.0, 2.5)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FLOOR_WINDOW = 16   # the floor-share gauges average this many of the latest finished requests


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.time_to_first_token = self._histogram(
            "hayate_time_to_first_token_seconds", "From arrival to the first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = self._histogram(
            "hayate_inter_token_latency_seconds", "Between successive tokens of one request.", _TOKEN_GAP_BUCKETS)
        self.e2e_latency = self._histogram(
            "hayate_e2e_request_latency_seconds", "From arrival to the last token.", _REQUEST_BUCKETS)
        self.queue_time = self._histogram(
            "hayate_request_queue_time_seconds", "From arrival to the first scheduled step.", _REQUEST_BUCKETS)
        self.prompt_tokens = Counter("hayate_prompt_tokens", "Prompt tokens of accepted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("hayate_generation_tokens", "Tokens generated.",
                                         registry=self.registry)
        self.requests = Counter("hayate_requests", "Engine requests ended, by finish reason.",
                                ["finish_reason"], registry=self.registry)
        # vLLM's names: speculative decoding's drafted tokens, and those the model accepted
        self.draft_tokens = Counter("hayate_spec_decode_num_draft_tokens", "Tokens drafted by speculative decoding.",
                                    registry=self.registry)
        self.accepted_tokens = Counter("hayate_spec_decode_num_accepted_tokens",
                                       "Drafted tokens the model accepted.", registry=self.registry)
        self.floor: LiveFloor | None = None   # set once measured, after the model loads
        self.decode_shares: deque[float] = deque(maxlen=FLOOR_WINDOW)
        self.prefill_shares: deque[float] = deque(maxlen=FLOOR_WINDOW)
        self.registry.register(FloorCollector(self))

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, documentation, buckets=buckets, registry=self.registry)

    def watch(self, stats: Callable[[], EngineStats | None]) -> None:
        """Gauges read from the engine at scrape time (0 while no engine is loaded)."""
        for name, field, documentation in (
                ("hayate_num_running_requests", "num_running", "Requests holding a batch slot."),
                ("hayate_num_waiting_requests", "num_waiting", "Requests queued for a batch slot."),
                ("hayate_kv_cache_usage_ratio", "kv_cache_usage", "Fraction of the KV cache in use, 0 to 1."),
                ("hayate_prefix_cache_hit_ratio", "prefix_cache_hit_rate",
                 "Prompt tokens found in the prefix cache, over the prompt tokens looked up since start.")):
            Gauge(name, documentation, registry=self.registry).set_function(_reader(stats, field))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, num_prompt_tokens: int) -> "RequestTracker":
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTracker(self)

    def observe_floor_share(self, output: RequestOutput) -> None:
        """Add a finished request's shares of the floor to the gauges' window."""
        if self.floor is None:
            return
        for shares, share in ((self.decode_shares, self.floor.decode_share(output)),
                              (self.prefill_shares, self.floor.prefill_share(output))):
            if share is not None:
                shares.append(share)


class FloorCollector:
    """The floor gauges, absent from /metrics until the floor is measured; each share gauge
    appears once a request has finished since then."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        floor = self.metrics.floor
        if floor is None:
            return
        yield GaugeMetricFamily(
            "hayate_decode_floor_tokens_per_second",
            f"hayate plan's floor for batch-1 decode at a {REFERENCE_CONTEXT}-token context on {floor.hardware}.",
            value=floor.decode_tokens_per_second())
        yield GaugeMetricFamily(
            "hayate_prefill_floor_tokens_per_second",
            f"hayate plan's floor for prefilling a {REFERENCE_PROMPT}-token prompt on {floor.hardware}.",
            value=floor.prefill_tokens_per_second())
        for name, shares, documentation in (
                ("hayate_decode_floor_share", self.metrics.decode_shares,
                 "Decode speed over the batch-1 floor (1 = at the floor; falls as requests share steps)"),
                ("hayate_prefill_floor_share", self.metrics.prefill_shares,
                 "Prefill speed of the uncached prompt tokens over the floor (1 = at the floor)")):
            if shares:
                yield GaugeMetricFamily(name, f"{documentation}, mean of the latest {FLOOR_WINDOW} requests.",
                                        value=sum(shares) / len(shares))


def _reader(stats: Callable[[], EngineStats | None], field: str) -> Callable[[], float]:
    return lambda: float(getattr(stats(), field, 0.0) or 0.0)


class RequestTracker:
    """Observes one engine request's outputs as they reach the server. Token counts and gaps
    reach the registry FLUSH_TOKENS at a time and at the end: one call per token, made while
    the event loop's caches are cold from a decode step, cost more than the flush loop."""

    FLUSH_TOKENS = 16

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_token_at: float | None = None
        self.finished = False
        self.tokens = 0
        self.gaps: list[float] = []

    def observe(self, output: RequestOutput) -> None:
        if output.token_ids:
            now = time.perf_counter()
            if self.last_token_at is None:
                if output.timings.time_to_first_token is not None:
                    self.metrics.time_to_first_token.observe(output.timings.time_to_first_token)
            else:
                self.gaps.append((now - self.last_token_at) / len(output.token_ids))
            self.last_token_at = now
            self.tokens += len(output.token_ids)
            if self.tokens >= self.FLUSH_TOKENS:
                self._flush()
        if output.finished:
            self._finish(output.finish_reason or "stop", output)

    def _flush(self) -> None:
        if self.tokens:
            self.metrics.generation_tokens.inc(self.tokens)
            self.tokens = 0
        for gap in self.gaps:
            self.metrics.inter_token_latency.observe(gap)
        self.gaps.clear()

    def abandon(self) -> None:
        """The client left (or the server stopped) before the request finished."""
        if not self.finished:
            self._finish("abort", None)

    def _finish(self, reason: str, output: RequestOutput | None) -> None:
        self.finished = True
        self._flush()
        self.metrics.requests.labels(finish_reason=reason).inc()
        if output is not None and output.timings.finished is not None:
            self.metrics.e2e_latency.observe(output.timings.finished - output.timings.arrival)
        if output is not None and output.timings.queue_time is not None:
            self.metrics.queue_time.observe(output.timings.queue_time)
        if output is not None and reason in ("stop", "length"):
            self.metrics.observe_floor_share(output)
        if output is not None and output.timings.speculative is not None:
            self.metrics.draft_tokens.inc(output.timings.speculative.num_draft_tokens)
            self.metrics.accepted_tokens.inc(output.timings.speculative.num_accepted_tokens)
