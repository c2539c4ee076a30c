"""Tensor parallel's costs on this machine: hayate with --tensor-parallel 1 (the planned step, and
the eager model it falls back to) and N (worker processes over gloo, eager steps), each loaded
in turn in this process, on the same
model, prompt and thread count: time to first token for one prompt, decode tokens/s of one
request and of a batch, whether the greedy tokens match, and the ranks' exchange time per
partial sum (two per layer and token).

    .venv/bin/python bench/tensor_parallel.py [--model PATH] [--tensor-parallel 2] [--threads 2]
                                              [--prompt-tokens 256] [--max-tokens 64] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

from hayate.llm import LLM
from hayate.sampling import SamplingParams


def measure(llm: LLM, prompt: list[int], args: argparse.Namespace) -> dict:
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompt[:32], SamplingParams(max_tokens=8, temperature=0))   # warm-up
    first = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
    alone = llm.generate(prompt, greedy)
    started = time.perf_counter()
    batch = llm.generate([prompt[i:] for i in range(args.batch)], greedy)
    batch_seconds = time.perf_counter() - started
    return {"ttft_ms": 1000 * first.timings.time_to_first_token,
            "decode": alone.decode_tokens_per_second,
            "batch": sum(len(r.token_ids) for r in batch) / batch_seconds,
            "tokens": alone.token_ids}


def exchange_ms(llm: LLM, tokens: int = 16) -> float:
    """Median time rank 0 spends in one partial-sum exchange during decode steps (the wait for
    the other ranks' share included)."""
    from hayate.layers.tensor_parallel import PartialSums

    times, original = [], PartialSums.__call__

    def timed(self, partial):
        started = time.perf_counter()
        try:
            return original(self, partial)
        finally:
            times.append(time.perf_counter() - started)

    PartialSums.__call__ = timed
    try:
        llm.generate([1, 2, 3], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    finally:
        PartialSums.__call__ = original
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--tensor-parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    runs = {"TP=1": dict(tensor_parallel=1), "TP=1 eager": dict(tensor_parallel=1, planned_decode=False),
            f"TP={args.tensor_parallel}": dict(tensor_parallel=args.tensor_parallel)}
    results = {}
    for name, settings in runs.items():
        llm = LLM(args.model, max_model_len=1024, max_num_seqs=args.batch, threads=args.threads, **settings)
        prompt = llm.tokenizer.encode("The history of the bicycle begins in the early nineteenth century. " * 40)
        results[name] = measure(llm, prompt[:args.prompt_tokens], args)
        if llm.engine.parallel is not None:
            results[name]["exchange_ms"] = exchange_ms(llm)
        llm.engine.close()
        del llm
    parallel = results[f"TP={args.tensor_parallel}"]
    print(f"model {args.model or 'default'} | {args.threads} threads | prompt {args.prompt_tokens} tokens, "
          f"{args.max_tokens} decoded, batch {args.batch}")
    print(f"{'':>34}" + "".join(f"{name:>12}" for name in runs) + f"{'TP/TP=1':>10}")
    for key, label in (("ttft_ms", "time to first token ms"), ("decode", "decode tokens/s"),
                       ("batch", f"batch {args.batch}: output tok/s, prefill in")):
        print(f"{label:>34}" + "".join(f"{results[name][key]:12.1f}" for name in runs)
              + f"{parallel[key] / results['TP=1'][key]:10.2f}")
    print(f"exchange per partial sum (median, rank 0; two a layer): {parallel['exchange_ms']:.3f} ms")
    print(f"greedy tokens identical: {all(r['tokens'] == results['TP=1']['tokens'] for r in results.values())}")


if __name__ == "__main__":
    main()
