"""Quality and speed of a weight mode and KV cache precision against the exact fp32 reference.

    .venv/bin/python bench/quality.py [--model PATH] [--weights int4-bf16] [--kv-cache-dtype auto]
                                      [--threads 2] [--max-tokens 48]

For each prompt: the greedy answer under both modes, whether they are identical, and how many
leading tokens agree; then decode tokens/s of each mode (single stream)."""
from __future__ import annotations

import argparse
import statistics

from hayate.bench.prompts import OPEN_PROMPTS, PARITY_PROMPTS
from hayate.config import KV_CACHE_DTYPES
from hayate.llm import LLM
from hayate.sampling import SamplingParams

PROMPTS = PARITY_PROMPTS + OPEN_PROMPTS


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def answers(llm: LLM, max_tokens: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [llm.chat([{"role": "user", "content": prompt}], params) for prompt in PROMPTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--weights", default="int4-bf16")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="the candidate's KV cache (the reference's is fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    reference = answers(LLM(args.model, threads=args.threads, weights="fp32"), args.max_tokens)
    candidate = answers(LLM(args.model, threads=args.threads, weights=args.weights,
                            kv_cache_dtype=args.kv_cache_dtype), args.max_tokens)
    label = args.weights if args.kv_cache_dtype == "auto" else f"{args.weights}, kv {args.kv_cache_dtype}"
    same = 0
    for prompt, ref, cand in zip(PROMPTS, reference, candidate):
        same += ref.token_ids == cand.token_ids
        prefix = agreeing_prefix(ref.token_ids, cand.token_ids)
        print(f"{prompt}\n  fp32:           {ref.text!r}\n  {label}: {cand.text!r}\n"
              f"  identical: {ref.token_ids == cand.token_ids}, agreeing prefix {prefix}/{len(ref.token_ids)} tokens")
    rate = {name: statistics.median(r.decode_tokens_per_second or 0 for r in results)
            for name, results in (("fp32", reference), (label, candidate))}
    print(f"identical greedy answers: {same}/{len(PROMPTS)}")
    print("decode tokens/s (median over prompts): " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))


if __name__ == "__main__":
    main()
