"""A real tool-calling model in `auto`: "What is the weather in Paris?" with a get_weather(city)
tool; prints the model's format, the raw answer, the parsed calls and the time.

    .venv/bin/python bench/tool_call_check.py --model /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

Exits 1 unless the answer is a call to get_weather with city Paris (greedy, so repeatable)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from hayate.llm import LLM
from hayate.sampling import SamplingParams

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"}},
                   "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a GGUF file of a tool-calling chat model")
    parser.add_argument("--tool-choice", default="auto")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    llm = LLM(args.model, threads=args.threads)
    print(f"tool format: {llm.tool_setup.format.name} (template renders tools: {llm.tool_setup.native})")
    begin = time.perf_counter()
    result = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=128), tools=TOOLS, tool_choice=args.tool_choice)
    elapsed = time.perf_counter() - begin
    print(f"raw answer: {result.text!r}")
    print(f"finish_reason: {result.finish_reason}; {len(result.token_ids)} tokens in {elapsed:.1f} s")
    calls = [(call.name, json.loads(call.arguments)) for call in result.tool_calls]
    for name, arguments in calls:
        print(f"call: {name}({json.dumps(arguments, ensure_ascii=False)})")
    ok = any(name == "get_weather" and str(arguments.get("city", "")).lower() == "paris" for name, arguments in calls)
    print("OK: a get_weather call with city Paris" if ok else "FAILED: no get_weather call with city Paris")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
