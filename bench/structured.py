"""Structured output's cost and gain on one warm in-process engine (the default model unless
--model): decode speed with a JSON schema against unconstrained decoding per generated token,
at batch 1 and 16; wall time per JSON answer with and without fast-forward; the mask fill per
step (p50 / p99) and its application per row; compile time per schema.

    .venv/bin/python bench/structured.py [--model PATH] [--batches 1 16] [--repeats 3]
        [--grammar-backend auto|llguidance]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hayate.config import GRAMMAR_BACKENDS
from hayate.kernels import native_kernels
from hayate.llm import LLM
from hayate.sampling import SamplingParams
from hayate.structured.masks import apply_bitmask_torch
from hayate.structured.requests import json_schema

PROMPT = [{"role": "user", "content": "Describe a fictional person as JSON with name, age, city, email and tags."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "email", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                         "maximum": 120}, "city": {"type": "string", "maxLength": 24},
                         "email": {"type": "string", "maxLength": 40},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}}
TOOL_ARRAY = {"type": "array", "minItems": 1, "maxItems": 2, "items": {"anyOf": [
    {"type": "object", "additionalProperties": False, "required": ["name", "arguments"], "properties": {
        "name": {"const": "get_weather"}, "arguments": {"type": "object", "additionalProperties": False,
        "required": ["city", "unit"], "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "object", "additionalProperties": False, "required": ["name", "arguments"], "properties": {
        "name": {"const": "search"}, "arguments": {"type": "object", "additionalProperties": False,
        "required": ["query"], "properties": {"query": {"type": "string", "maxLength": 30}}}}}]}}
SMALL = {"type": "object", "additionalProperties": False, "required": ["answer", "confidence"],
         "properties": {"answer": {"enum": ["yes", "no", "unsure"]},
                        "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}}
SCHEMAS = {"small": SMALL, "person": PERSON, "tool-array": TOOL_ARRAY}


def decode_time(results) -> tuple[float, int]:
    """Seconds from each request's first token to its end, and the tokens after the first."""
    seconds = sum(r.timings.finished - r.timings.first_token for r in results)
    return seconds, sum(len(r.token_ids) - 1 for r in results)


def run(llm: LLM, prompt: list[int], params: SamplingParams, batch: int, fast_forward: bool):
    llm.engine.fast_forward = fast_forward
    started = time.perf_counter()
    results = llm.generate([prompt] * batch, [params] * batch)
    return time.perf_counter() - started, results


def speed_rows(llm: LLM, prompt: list[int], batch: int, repeats: int) -> None:
    """Per generated token, fast-forward off (every token a decode step): schema vs free."""
    schema = json_schema(PERSON)
    constrained, free = [], []
    for seed in range(repeats):
        _, results = run(llm, prompt, SamplingParams(max_tokens=160, temperature=0.7, seed=seed, grammar=schema),
                         batch, fast_forward=False)
        constrained.append(decode_time(results))
        length = max(2, round(statistics.mean(len(r.token_ids) for r in results)))
        _, results = run(llm, prompt, SamplingParams(max_tokens=length, temperature=0.7, seed=seed, ignore_eos=True),
                         batch, fast_forward=False)
        free.append(decode_time(results))
    rate = [sum(tokens for _, tokens in rows) / sum(seconds for seconds, _ in rows) for rows in (constrained, free)]
    print(f"batch {batch:2d}: decode {rate[0]:7.1f} tok/s per request with the schema, {rate[1]:7.1f} "
          f"unconstrained: {100 * rate[0] / rate[1]:5.1f}%")


def answer_rows(llm: LLM, prompt: list[int], batch: int, repeats: int) -> None:
    for name, schema in SCHEMAS.items():
        params = SamplingParams(max_tokens=200, temperature=0, grammar=json_schema(schema))
        walls, outputs = {}, {}
        for fast_forward in (False, True):
            times = []
            for _ in range(repeats):
                seconds, results = run(llm, prompt, params, batch, fast_forward)
                times.append(seconds)
            walls[fast_forward], outputs[fast_forward] = statistics.median(times), results
        tokens = len(outputs[True][0].token_ids)
        same = [r.token_ids for r in outputs[True]] == [r.token_ids for r in outputs[False]]
        free_params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        free = statistics.median(run(llm, prompt, free_params, batch, False)[0] for _ in range(repeats))
        print(f"batch {batch:2d} {name:10s} {tokens:3d} tokens: {1000 * walls[False]:7.1f} ms without fast-forward, "
              f"{1000 * walls[True]:7.1f} ms with, {1000 * free:7.1f} ms unconstrained same length; "
              f"greedy identical: {same}")


def mask_rows(llm: LLM) -> None:
    by_rows: dict[int, list[float]] = {}
    for seconds, rows in llm.engine.runner.masks.fill_times:
        by_rows.setdefault(rows, []).append(seconds)
    for rows, times in sorted(by_rows.items()):
        if len(times) >= 20:
            times.sort()
            p50, p99 = times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]
            print(f"mask fill, steps of {rows:2d} constrained rows ({len(times)} steps): p50 {1e6 * p50:.0f} us, "
                  f"p99 {1e6 * p99:.0f} us a step ({1e6 * p50 / rows:.0f} / {1e6 * p99 / rows:.0f} us a row)")
    vocab = llm.engine.grammars.vocab_size
    logits = torch.randn(16, vocab)
    bitmask = torch.randint(-2**31, 2**31 - 1, (16, (vocab + 31) // 32), dtype=torch.int32)
    bitmask[:, 8:] = 0   # mostly-disallowed rows, as grammars make them
    kernels = native_kernels()
    for name, apply in (("native", lambda: kernels.mask_logits_(logits, bitmask, list(range(16)))),
                        ("torch unpack", lambda: apply_bitmask_torch(logits, bitmask, list(range(16))))):
        if name == "native" and kernels is None:
            continue
        times = []
        for _ in range(50):
            began = time.perf_counter()
            apply()
            times.append(time.perf_counter() - began)
        print(f"mask apply ({name}), {vocab} logits: {1e6 * statistics.median(times) / 16:.1f} us per row")


def compile_rows(llm: LLM) -> None:
    """Uncached compiles: llguidance's (every spec's check) and, routed, xgrammar's (its masks)."""
    backend = llm.engine.grammars
    compilers = {"llguidance": getattr(backend, "checker", backend)._compiled}
    if hasattr(backend, "fast"):
        compilers["xgrammar"] = backend.fast._compile
    for name, schema in SCHEMAS.items():
        spec = json_schema(schema)
        line = []
        for engine, compile_spec in compilers.items():
            times = []
            for _ in range(5):
                began = time.perf_counter()
                compile_spec(spec)
                times.append(time.perf_counter() - began)
            line.append(f"{engine} {1000 * statistics.median(times):.2f} ms")
        print(f"compile {name:10s}: " + ", ".join(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: hayate's default model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grammar-backend", default="auto", choices=GRAMMAR_BACKENDS,
                        help="auto: xgrammar's masks for the JSON schemas it takes (all of these)")
    args = parser.parse_args()
    began = time.perf_counter()
    llm = LLM(args.model, max_num_seqs=max(args.batches), grammar_backend=args.grammar_backend)
    print(f"loaded in {time.perf_counter() - began:.2f} s (grammar backend included)")
    prompt = llm.encode_chat(PROMPT)
    compile_rows(llm)
    for batch in args.batches:
        speed_rows(llm, prompt, batch, args.repeats)
        answer_rows(llm, prompt, batch, args.repeats)
    mask_rows(llm)


if __name__ == "__main__":
    main()
