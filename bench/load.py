"""Load generator for any OpenAI-compatible chat-completions server.

For each concurrency level, N streaming clients send requests back to back until the level's
request count is done; it reports time to first token, inter-token latency, end-to-end latency,
throughput and errors.  Usage: see bench/README.md or `python bench/load.py --help`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx

EXIT_FAILED = 1
EXIT_USAGE = 2
DONE = "[DONE]"
GROQ_TIMING_FIELDS = ("queue_time", "prompt_time", "completion_time", "total_time")
WARMUP_MAX_TOKENS = 8
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper who has never seen the sea.",
    "List five tips for writing readable Python code, with one sentence each.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old.",
    "What is the difference between a process and a thread? Give an example of each.",
    "Translate into French: 'The train leaves at seven, so we should eat early.'",
    "A farmer has 17 sheep and all but 9 run away. How many are left? Explain your reasoning.",
    "Describe how a bicycle's gears make climbing a hill easier.",
    "Give me three ideas for a vegetarian dinner that takes under thirty minutes.",
)


class Unreachable(Exception):
    """The server could not be reached before the run began."""


@dataclass
class BenchConfig:
    base_url: str                      # e.g. http://127.0.0.1:8000/v1
    concurrency_levels: list[int]
    requests: int = 32                 # per concurrency level
    max_tokens: int = 128
    model: str | None = None           # None: the first id from GET /models
    api_key: str | None = None
    prompts: tuple[str, ...] = BUILTIN_PROMPTS
    label: str = ""
    timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)   # merged into every request (hayate's own fields)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.concurrency_levels or min(self.concurrency_levels) < 1:
            raise ValueError("--concurrency needs positive integers, e.g. 1,4,16")
        if self.requests < 1 or self.max_tokens < 1:
            raise ValueError("--requests and --max-tokens must be at least 1")
        if not self.prompts:
            raise ValueError("no prompts: the prompt file has no non-empty lines")


@dataclass
class RequestResult:
    ttft_s: float | None = None        # send to first non-empty content delta
    chunk_gaps_s: list[float] = field(default_factory=list)  # between content chunks
    latency_s: float = 0.0             # send to end of stream
    num_chunks: int = 0                # content chunks (one may carry several tokens)
    last_content_s: float | None = None
    completion_tokens: int | None = None  # from usage; None if the server sent none
    server_timings: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.num_chunks

    def decode_rate(self) -> float | None:
        """Tokens per second after the first; counts tokens from usage, not chunks."""
        if self.ttft_s is None or self.last_content_s is None or self.output_tokens < 2:
            return None
        decode_s = self.last_content_s - self.ttft_s
        return (self.output_tokens - 1) / decode_s if decode_s > 0 else None


@dataclass
class Spread:
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> Spread:
        scaled = [value * scale for value in values]
        return cls(*(percentile(scaled, q) for q in (50, 90, 99)))


@dataclass
class LevelReport:
    concurrency: int
    completed: int
    errors: int
    wall_time_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: Spread
    itl_ms: Spread
    itl_p99_over_p50: float | None
    e2e_s: Spread
    decode_tokens_per_s_p50: float | None  # per-request decode rate, median
    server_timings_p50: dict[str, float]   # GroqCloud usage timings, when sent
    first_error: str | None


# ---- pure helpers -------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between ranks like numpy's default; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_sse_line(line: str) -> dict | str | None:
    """One SSE line: a parsed JSON chunk, DONE, or None for blanks, comments and other fields.

    Raises ValueError when a data line holds neither JSON nor [DONE]."""
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == DONE:
        return DONE
    if not payload:
        return None
    chunk = json.loads(payload)
    if not isinstance(chunk, dict):
        raise ValueError(f"SSE data is not a JSON object: {one_line(payload)}")
    return chunk


def chunk_content(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    delta = (choices[0].get("delta") or {}) if choices else {}
    return delta.get("content") or ""


def chunk_finish_reason(chunk: dict) -> str | None:
    choices = chunk.get("choices") or []
    return choices[0].get("finish_reason") if choices else None


def chunk_usage(chunk: dict) -> dict:
    """usage, merged with GroqCloud's x_groq.usage when present."""
    usage = dict(chunk.get("usage") or {})
    usage.update((chunk.get("x_groq") or {}).get("usage") or {})
    return usage


def apply_chunk(result: RequestResult, chunk: dict, elapsed_s: float) -> None:
    """Fold one streamed chunk, received elapsed_s after sending, into result."""
    if "error" in chunk:
        raise ValueError(f"server error in stream: {one_line(json.dumps(chunk['error']))}")
    if chunk_content(chunk):
        if result.ttft_s is None:
            result.ttft_s = elapsed_s
        else:
            result.chunk_gaps_s.append(elapsed_s - result.last_content_s)
        result.last_content_s = elapsed_s
        result.num_chunks += 1
    result.finish_reason = chunk_finish_reason(chunk) or result.finish_reason
    usage = chunk_usage(chunk)
    if usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
    result.server_timings.update({name: float(usage[name]) for name in GROQ_TIMING_FIELDS
                                  if isinstance(usage.get(name), (int, float))})


def one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def summarize(concurrency: int, results: list[RequestResult], wall_time_s: float) -> LevelReport:
    ok = [result for result in results if result.error is None]
    failed = [result for result in results if result.error is not None]
    output_tokens = sum(result.output_tokens for result in ok)
    itl = Spread.of([gap for result in ok for gap in result.chunk_gaps_s], scale=1000)
    rates = [rate for rate in (result.decode_rate() for result in ok) if rate is not None]
    timing_names = sorted({name for result in ok for name in result.server_timings})
    return LevelReport(
        concurrency=concurrency, completed=len(ok), errors=len(failed), wall_time_s=wall_time_s,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_time_s if wall_time_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_time_s if wall_time_s > 0 else 0.0,
        ttft_ms=Spread.of([r.ttft_s for r in ok if r.ttft_s is not None], scale=1000),
        itl_ms=itl, itl_p99_over_p50=itl.p99 / itl.p50 if itl.p50 else None,
        e2e_s=Spread.of([result.latency_s for result in ok]),
        decode_tokens_per_s_p50=percentile(rates, 50),
        server_timings_p50={name: percentile([r.server_timings[name] for r in ok
                                              if name in r.server_timings], 50)
                            for name in timing_names},
        first_error=failed[0].error if failed else None)


# ---- the client -------------------------------------------------------------------------

def chat_payload(model: str, prompt: str, max_tokens: int, extra_body: dict | None = None) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra_body or {})}


async def stream_chat(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    """Send one streaming request; every failure is recorded in result.error, never raised."""
    result = RequestResult()
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {one_line(body)}"
            else:
                await read_stream(response, result, started)
    except (httpx.HTTPError, ValueError) as error:
        result.error = f"{type(error).__name__}: {one_line(str(error))}"
    result.latency_s = time.perf_counter() - started
    return result


async def read_stream(response: httpx.Response, result: RequestResult, started: float) -> None:
    async for line in response.aiter_lines():
        event = parse_sse_line(line)
        if event == DONE:
            if result.finish_reason is None:  # llama-cpp-python ends interrupted streams so
                result.error = "stream ended without a finish_reason (interrupted by the server?)"
            return
        if event is not None:
            apply_chunk(result, event, time.perf_counter() - started)
    result.error = "stream ended before data: [DONE]"


async def resolve_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    """Check the server answers; return --model or the first id it lists."""
    try:
        response = await client.get(f"{config.base_url}/models", timeout=10)
    except httpx.HTTPError as error:
        raise Unreachable(f"cannot reach {config.base_url}: {type(error).__name__}: {error}") from error
    if response.status_code in (401, 403):
        raise Unreachable(f"{config.base_url}/models answered {response.status_code}: check --api-key")
    if config.model:
        return config.model
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, LookupError, TypeError):
        return "default"


async def run_level(client: httpx.AsyncClient, config: BenchConfig, model: str,
                    concurrency: int) -> LevelReport:
    url = f"{config.base_url}/chat/completions"
    pending = iter([chat_payload(model, config.prompts[i % len(config.prompts)], config.max_tokens, config.extra_body)
                    for i in range(config.requests)])
    results: list[RequestResult] = []

    async def client_loop() -> None:
        for payload in pending:  # shared iterator: each client takes the next request
            results.append(await stream_chat(client, url, payload))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return summarize(concurrency, results, time.perf_counter() - started)


async def run_benchmark(config: BenchConfig, progress: Callable[[str], None] = lambda line: None
                        ) -> dict:
    """Warm up once, then run every concurrency level; returns the JSON-ready report."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=max(config.concurrency_levels) + 4)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=config.timeout_s) as client:
        model = await resolve_model(client, config)
        warmup = chat_payload(model, config.prompts[0], WARMUP_MAX_TOKENS, config.extra_body)
        warmed = await stream_chat(client, f"{config.base_url}/chat/completions", warmup)
        progress(f"warm-up: {warmed.error or f'ok in {warmed.latency_s:.2f} s'}")
        levels = []
        for concurrency in config.concurrency_levels:
            level = await run_level(client, config, model, concurrency)
            progress(f"concurrency {concurrency}: {level.completed} ok, {level.errors} errors "
                     f"in {level.wall_time_s:.1f} s")
            levels.append(level)
    return {"label": config.label, "url": config.base_url, "model": model,
            "max_tokens": config.max_tokens, "requests_per_level": config.requests,
            "levels": [asdict(level) for level in levels]}


# ---- output -----------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict) -> str:
    title = f"{report['label'] or report['url']}  model={report['model']}  " \
            f"max_tokens={report['max_tokens']}  requests/level={report['requests_per_level']}"
    header = ("conc", "ok", "err", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "p99/p50",
              "E2E p50/p99 s", "dec tok/s", "out tok/s", "req/s")
    rows = [header] + [level_row(level) for level in report["levels"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [title] + ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    for level in report["levels"]:
        if level["server_timings_p50"]:
            timings = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in level["server_timings_p50"].items())
            lines.append(f"  conc {level['concurrency']} server timings p50: {timings}")
        if level["first_error"]:
            lines.append(f"  conc {level['concurrency']} first error: {level['first_error']}")
    return "\n".join(lines)


def level_row(level: dict) -> tuple[str, ...]:
    ttft, itl, e2e = level["ttft_ms"], level["itl_ms"], level["e2e_s"]
    return (str(level["concurrency"]), str(level["completed"]), str(level["errors"]),
            "/".join(fmt(ttft[p]) for p in ("p50", "p90", "p99")),
            "/".join(fmt(itl[p], 1) for p in ("p50", "p90", "p99")),
            fmt(level["itl_p99_over_p50"], 2), f"{fmt(e2e['p50'], 2)}/{fmt(e2e['p99'], 2)}",
            fmt(level["decode_tokens_per_s_p50"], 1), fmt(level["output_tokens_per_s"], 1),
            fmt(level["requests_per_s"], 2))


# ---- command line -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Streaming load test of an OpenAI-compatible chat server.")
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    parser.add_argument("--model", help="model name to send (default: first id from GET /models)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--prompt-file", type=Path, help="one prompt per line (default: built-in varied prompts)")
    parser.add_argument("--json", type=Path, help="also write the full report here")
    parser.add_argument("--label", default="", help="name for this run in the table and JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    prompts = BUILTIN_PROMPTS
    if args.prompt_file:
        lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
        prompts = tuple(line.strip() for line in lines if line.strip())
    return BenchConfig(base_url=args.url, concurrency_levels=levels, requests=args.requests,
                       max_tokens=args.max_tokens, model=args.model, api_key=args.api_key,
                       prompts=prompts, label=args.label, timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        report = asyncio.run(run_benchmark(config, progress=lambda line: print(line, file=sys.stderr)))
        print(format_table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except (ValueError, OSError, Unreachable) as error:
        print(f"load.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_FAILED if all(level["completed"] == 0 for level in report["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
