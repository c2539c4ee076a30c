"""Greedy parity with transformers on one GGUF file: the same prompt token ids (hayate's chat
template) through hayate (its default weights: native kernels, fp32 activations) and through
transformers loading the same file dequantized to fp32; for each prompt, whether the answers
are identical and, where they part, the reference's gap between its top two logits there (a
gap under 1e-4 is a near-tie that summation order alone can flip).

    .venv/bin/python bench/parity.py --model FILE.gguf [--max-tokens 32] [--threads 2]

Exits 1 if an answer parts from the reference where the reference's top two logits are
not a near-tie (`make test-real` runs it on every catalogue model).

transformers needs `accelerate` and `gguf` (hayate's test extras) and fp32 room for the model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hayate.bench.prompts import OPEN_PROMPTS, PARITY_PROMPTS
from hayate.llm import LLM
from hayate.sampling import SamplingParams

PROMPTS = (PARITY_PROMPTS + OPEN_PROMPTS)[:8]
NEAR_TIE = 1e-4   # a top-2 logit gap this small can flip with the order of a sum


def reference_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def reference_answer(model, prompt_ids: list[int], max_tokens: int, stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens, and the gap between the top two logits at each step."""
    ids = torch.tensor([prompt_ids])
    tokens, gaps, past = [], [], None
    for _ in range(max_tokens):
        out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        top = torch.topk(logits, 2)
        tokens.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        if tokens[-1] in stop_ids:
            break
        ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return tokens, gaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, threads=args.threads)
    stop_ids = set(llm.engine.eos_token_ids)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    prompts = [llm.encode_chat([{"role": "user", "content": prompt}]) for prompt in PROMPTS]
    ours = [llm.generate(ids, params).token_ids for ids in prompts]
    model = reference_model(Path(args.model))
    identical, unexplained = 0, 0
    for prompt, ids, answer in zip(PROMPTS, prompts, ours):
        expected, gaps = reference_answer(model, ids, args.max_tokens, stop_ids)
        same = answer == expected
        identical += same
        where = next((i for i, (a, b) in enumerate(zip(answer, expected)) if a != b), None)
        unexplained += not same and (where is None or gaps[where] >= NEAR_TIE)
        detail = "identical" if same else (f"parts at token {where}, reference top-2 gap {gaps[where]:.2e}"
                                           if where is not None else "lengths differ")
        print(f"{detail:50s} {prompt[:60]!r}")
        if not same:
            print(f"    hayate:       {llm.tokenizer.decode(answer)!r}\n    transformers: {llm.tokenizer.decode(expected)!r}")
    print(f"{identical} of {len(PROMPTS)} greedy answers identical for {args.max_tokens} tokens; "
          f"{unexplained} differences that are not near-ties")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
