"""Speculative decoding by prompt lookup (`speculative="ngram"`) against plain decoding on one
warm in-process engine (the default model unless --model): decode tokens/s of one request at
a time on input-grounded prompts (rename a variable in a 60-line function, fix one line, a
summary that quotes its source) and
on a free-form one, greedy and sampled (seeded), the modes taking turns in rounds whose
order alternates; drafted and accepted tokens; whether the answers are identical.

With --draft MODEL, hayate drafting with that smaller model (same tokenizer) takes its turns
too. With --compare llama.cpp, llama.cpp (llama-cpp-python in .venv-bench, `make bench-env`) on
the same file and token ids takes its turns too, plain and with its own prompt lookup
(`LlamaPromptLookupDecoding`, --llama-draft-tokens / --llama-ngram), each in its own process,
greedy, to the same stop tokens; the sampled prompt is hayate's alone.

    .venv/bin/python bench/speculative.py [--model PATH] [--rounds 3] [--max-tokens 640]
                                          [--speculative-tokens 6] [--speculative-ngram 3]
                                          [--draft MODEL] [--compare llama.cpp] [--llama-draft-tokens 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from hayate.bench.peers import DEFAULT_LLAMA_PYTHON, PeerProcess, peer_job
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
FIX = ("This function has a bug: refunds (negative amounts) should be added to the totals, not skipped. "
       "Reply with the whole corrected function only.\n\n" + FUNCTION)


# An invented report, for a summary that quotes it: the answer copies whole sentences.
REPORT = """Minutes of the Harbour Bridge committee, 14 March.
The chair opened the meeting by noting that the east span has been closed to lorries since the
January storm, and that the detour adds forty minutes to every delivery to the fish market.
The engineer reported that "the corrosion on the third pier is worse than the 2019 survey
suggested, but the deck itself is sound and can carry cars and bicycles safely."
She proposed replacing the pier's steel jacket over two summers, at an estimated cost of
1.8 million, and warned that "every winter we wait adds roughly ten per cent to the bill."
The treasurer answered that the harbour fund holds 1.1 million and that "a loan for the rest is
possible, but only if the council agrees to raise the mooring fees by a fifth."
Two fishermen present objected that "higher fees would push the smaller boats to Kessock,
and the market would lose the very trade the bridge is meant to serve."
After discussion the committee agreed three points: the engineer will publish the full survey
by the end of April; the treasurer will ask the bank for terms on a loan of 0.7 million; and
the chair will write to the Kessock harbour master to ask whether a shared fee could be set.
The next meeting will be held on 11 April, when a vote on the repairs is expected."""
QUOTES = ("Summarize these minutes for a colleague who missed the meeting. Quote every sentence that "
          "appears in quotation marks word for word, and list the three agreed points exactly as "
          "written.\n\n" + REPORT)


def rename(name: str) -> str:
    """The request to rename FUNCTION's x to `name`."""
    return (f"Rewrite this Python function, renaming the variable x to {name} everywhere. "
            f"Reply with the whole function only.\n\n{FUNCTION}")


PROMPTS = [
    ("rename x -> count", rename("count"), 0.0),
    ("fix one line", FIX, 0.0),
    ("quote-heavy summary", QUOTES, 0.0),
    ("free-form", STORY, 0.0),
    ("free-form t=0.8", STORY, 0.8),
]


def decode_rate(tokens: list[int], seconds: float) -> float:
    """Tokens per second after the first (the prefill's), for one request."""
    return (len(tokens) - 1) / max(seconds, 1e-9)


# A mode: a request's prompt -> (its tokens, seconds from the first to the last, speculative counts or None)
Mode = Callable[[list[int]], tuple[list[int], float, object]]


def hayate_mode(llm: LLM, params: SamplingParams) -> Mode:
    def run(prompt: list[int]):
        result: GenerationResult = llm.generate(prompt, params)
        timings = result.timings
        return result.token_ids, timings.finished - timings.first_token, timings.speculative
    return run


def peer_mode(peer: PeerProcess, max_tokens: int, stop: list[int]) -> Mode:
    def run(prompt: list[int]):
        times, tokens = peer.generate(prompt, max_tokens, stop)
        return tokens, times[-1] - times[0], None
    return run


def compare(modes: dict[str, Mode], name: str, prompt: list[int], rounds: int) -> None:
    """Rounds of one request per mode, in alternating order; medians. A sampled request is
    seeded: with speculation it must give the same tokens."""
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    answers: dict[str, tuple] = {}
    for round_index in range(rounds):
        for mode in (list(modes) if round_index % 2 == 0 else list(modes)[::-1]):
            answers[mode] = modes[mode](prompt)
            rates[mode].append(decode_rate(*answers[mode][:2]))
    medians = {mode: statistics.median(rates[mode]) for mode in modes}

    def against_plain(mode: str) -> str:   # a speculative mode of hayate's beside its plain decoding
        counts = answers[mode][2]
        return (f"{mode} {medians[mode]:6.1f} tok/s ({medians[mode] / medians['plain']:4.2f}x plain); "
                f"{counts.num_accepted_tokens}/{counts.num_draft_tokens} drafted accepted in "
                f"{counts.num_draft_steps} steps; identical: {answers['plain'][0] == answers[mode][0]}")

    print(f"{name:19s} {len(prompt):4d} prompt, {len(answers['plain'][0]):4d} answer tokens: "
          f"plain {medians['plain']:6.1f} tok/s, {against_plain('ngram')}")
    if "llama.cpp" in modes:
        plain, lookup = medians["llama.cpp"], medians["llama.cpp lookup"]
        print(f"{'':19s} llama.cpp {len(answers['llama.cpp'][0]):4d} answer tokens: plain {plain:6.1f} tok/s, "
              f"prompt lookup {lookup:6.1f} tok/s ({lookup / plain:4.2f}x), identical: "
              f"{answers['llama.cpp'][0] == answers['llama.cpp lookup'][0]}; hayate ngram / llama.cpp lookup "
              f"{medians['ngram'] / lookup:4.2f}x, hayate plain / llama.cpp plain {medians['plain'] / plain:4.2f}x")
    if "draft" in modes:
        print(f"{'':19s} {against_plain('draft')}")
    print(f"{'':19s} rounds " + "; ".join(f"{mode} {[round(r, 1) for r in rates[mode]]}" for mode in modes))


def start_llama(args: argparse.Namespace, path: str, threads: int, n_ctx: int) -> dict[str, PeerProcess]:
    """llama.cpp plain and with its prompt lookup, a process each."""
    base = {"model": path, "threads": threads, "n_ctx": n_ctx}
    lookup = {"num_pred_tokens": args.llama_draft_tokens, "max_ngram_size": args.llama_ngram}
    peers = {}
    for mode, job in (("llama.cpp", base), ("llama.cpp lookup", {**base, "prompt_lookup": lookup})):
        peers[mode] = PeerProcess(peer_job("llama.cpp", job, args.max_tokens, args.llama_python, False), 3600)
        print(f"{mode}: loaded in {peers[mode].load_s:.2f} s")
    return peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: hayate's default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=640)
    parser.add_argument("--speculative-tokens", type=int, default=6)
    parser.add_argument("--speculative-ngram", type=int, default=3)
    parser.add_argument("--draft", help="a draft model (a smaller model with the same tokenizer) to time too")
    parser.add_argument("--compare", choices=["llama.cpp"], help="time llama.cpp too, plain and with its prompt lookup")
    parser.add_argument("--llama-python", type=Path, default=DEFAULT_LLAMA_PYTHON)
    parser.add_argument("--llama-draft-tokens", type=int, default=2,
                        help="LlamaPromptLookupDecoding's num_pred_tokens (default 2, its docs' advice for CPUs)")
    parser.add_argument("--llama-ngram", type=int, default=2, help="its max_ngram_size (default 2, its default)")
    args = parser.parse_args()
    began = time.perf_counter()
    drafting = {"speculative": "draft", "speculative_model": args.draft} if args.draft else {}
    llm = LLM(args.model, threads=args.threads, **drafting)
    print(f"loaded in {time.perf_counter() - began:.2f} s; decode path: "
          f"{'planned' if llm.engine.runner.plan is not None else 'eager'}"
          + (f"; a draft token {llm.engine.draft.step_seconds * 1e3:.1f} ms" if args.draft else ""))
    # warm-up; the first speculative request times the planned step by rows (draft_policy.py)
    llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0, speculative="ngram"))
    costs = llm.engine.scheduler.drafter.costs.seconds
    print("step time by rows, of one row's: " + " ".join(f"{rows}:{t / costs[0]:.2f}" for rows, t in
                                                         enumerate(costs, 1) if rows in (1, 2, 3, 4, 8, 16)))
    # llama.cpp's prompt lookup keeps logits for every position of its context: n_ctx x vocab floats
    context = min(llm.engine.max_model_len, 2048)
    peers = start_llama(args, str(llm.model_path), args.threads, context) if args.compare else {}
    try:
        for name, text, temperature in PROMPTS:
            plain = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=1, speculative="off")
            ngram = replace(plain, speculative="ngram", speculative_tokens=args.speculative_tokens,
                            speculative_ngram=args.speculative_ngram)
            modes = {"plain": hayate_mode(llm, plain), "ngram": hayate_mode(llm, ngram)}
            if args.draft:
                modes["draft"] = hayate_mode(llm, replace(plain, speculative="draft",
                                                          speculative_tokens=args.speculative_tokens))
            if temperature == 0:
                stop = sorted(llm.tokenizer.eos_token_ids)
                modes.update({mode: peer_mode(peer, args.max_tokens, stop) for mode, peer in peers.items()})
            compare(modes, name, llm.encode_chat([{"role": "user", "content": text}]), args.rounds)
    finally:
        for peer in peers.values():
            peer.close()


if __name__ == "__main__":
    main()
