"""Speculative decoding by prompt lookup (`speculative="ngram"`) against plain decoding on one
warm in-process engine (the default model unless --model): decode tokens/s of one request at
a time on input-grounded prompts (rename a variable in a 60-line function, fix one line) and
on a free-form one, greedy and sampled (seeded), the two modes taking turns in rounds whose
order alternates; drafted and accepted tokens; whether the answers are identical.

    .venv/bin/python bench/speculative.py [--model PATH] [--rounds 3] [--max-tokens 640]
                                          [--speculative-tokens 6] [--speculative-ngram 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from hayate.llm import LLM, GenerationResult
from hayate.sampling import SamplingParams

FUNCTION = '''def summarize_orders(orders, x=0):
    """Count, total and group a list of order dicts; x counts the orders seen."""
    totals = {}
    largest = None
    for order in orders:
        x = x + 1
        customer = order.get("customer", "unknown")
        amount = float(order.get("amount", 0))
        if amount < 0:
            print("skipping refund", x, customer)
            continue
        if customer not in totals:
            totals[customer] = {"orders": 0, "amount": 0.0, "first": x}
        totals[customer]["orders"] += 1
        totals[customer]["amount"] += amount
        totals[customer]["last"] = x
        if largest is None or amount > largest["amount"]:
            largest = {"customer": customer, "amount": amount, "index": x}
    report = []
    for customer, entry in sorted(totals.items()):
        share = entry["orders"] / x if x else 0.0
        line = f"{customer}: {entry['orders']} orders, {entry['amount']:.2f} total"
        line += f", {share:.0%} of {x} orders"
        line += f", first at {entry['first']}, last at {entry['last']}"
        report.append(line)
    if largest is not None:
        report.append(f"largest: {largest['customer']} {largest['amount']:.2f} (order {largest['index']})")
    average = sum(entry["amount"] for entry in totals.values()) / x if x else 0.0
    report.append(f"average over {x} orders: {average:.2f}")
    busiest = max(totals.items(), key=lambda item: item[1]["orders"], default=None)
    if busiest is not None:
        name, entry = busiest
        report.append(f"busiest: {name} with {entry['orders']} of {x} orders")
    quiet = [name for name, entry in totals.items() if entry["orders"] == 1]
    if quiet:
        report.append(f"{len(quiet)} customers ordered once in {x} orders")
    if x > 100:
        report.append("large batch: " + str(x))
    elif x > 10:
        report.append("medium batch: " + str(x))
    else:
        report.append("small batch: " + str(x))
    checks = 0
    for customer, entry in totals.items():
        if entry["first"] > entry["last"]:
            raise ValueError(f"bad order indices for {customer}")
        if entry["last"] > x:
            raise ValueError(f"index past {x} for {customer}")
        checks += 1
    if checks != len(totals):
        raise RuntimeError("not every customer was checked")
    summary = {
        "count": x,
        "customers": len(totals),
        "average": average,
        "largest": largest,
        "report": report,
    }
    return summary
'''
STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# (name, user message, temperature): greedy answers, and a seeded sampled one
PROMPTS = [
    ("rename x -> count", "Rewrite this Python function, renaming the variable x to count everywhere. "
                          "Reply with the whole function only.\n\n" + FUNCTION, 0.0),
    ("fix one line", "This function has a bug: refunds (negative amounts) should be added to the totals, not "
                     "skipped. Reply with the whole corrected function only.\n\n" + FUNCTION, 0.0),
    ("free-form", STORY, 0.0),
    ("free-form t=0.8", STORY, 0.8),
]


def decode_rate(result: GenerationResult) -> float:
    """Tokens per second after the first (the prefill's), for one request."""
    return (len(result.token_ids) - 1) / max(result.timings.finished - result.timings.first_token, 1e-9)


def compare(llm: LLM, name: str, prompt: list[int], temperature: float, args: argparse.Namespace) -> None:
    """Rounds of one plain and one speculative request, in alternating order; medians. A
    sampled request is seeded: with speculation it must give the same tokens."""
    plain = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=1, speculative="off")
    modes = {"plain": plain, "ngram": replace(plain, speculative="ngram", speculative_tokens=args.speculative_tokens,
                                              speculative_ngram=args.speculative_ngram)}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    answers: dict[str, GenerationResult] = {}
    for round_index in range(args.rounds):
        for mode in (list(modes) if round_index % 2 == 0 else list(modes)[::-1]):
            answers[mode] = llm.generate(prompt, modes[mode])
            rates[mode].append(decode_rate(answers[mode]))
    plain, ngram = (statistics.median(rates[mode]) for mode in modes)
    counts = answers["ngram"].timings.speculative
    print(f"{name:18s} {len(prompt):4d} prompt, {len(answers['plain'].token_ids):4d} answer tokens "
          f"({answers['plain'].finish_reason}): "
          f"plain {plain:6.1f} tok/s, ngram {ngram:6.1f} tok/s ({ngram / plain:4.2f}x); "
          f"{counts.num_accepted_tokens}/{counts.num_draft_tokens} drafted accepted in {counts.num_draft_steps} steps; "
          f"identical: {answers['plain'].token_ids == answers['ngram'].token_ids}")
    print(f"{'':18s} rounds plain {[round(r, 1) for r in rates['plain']]}, ngram {[round(r, 1) for r in rates['ngram']]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: hayate's default model")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=640)
    parser.add_argument("--speculative-tokens", type=int, default=6)
    parser.add_argument("--speculative-ngram", type=int, default=3)
    args = parser.parse_args()
    began = time.perf_counter()
    llm = LLM(args.model, threads=args.threads)
    print(f"loaded in {time.perf_counter() - began:.2f} s; decode path: "
          f"{'planned' if llm.engine.runner.plan is not None else 'eager'}")
    # warm-up; the first speculative request times the planned step by rows (draft_policy.py)
    llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0, speculative="ngram"))
    costs = llm.engine.scheduler.drafter.costs.seconds
    print("step time by rows, of one row's: " + " ".join(f"{rows}:{t / costs[0]:.2f}" for rows, t in
                                                         enumerate(costs, 1) if rows in (1, 2, 3, 4, 8, 16)))
    for name, text, temperature in PROMPTS:
        compare(llm, name, llm.encode_chat([{"role": "user", "content": text}]), temperature, args)


if __name__ == "__main__":
    main()
