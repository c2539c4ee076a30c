"""Measure one peer engine (llama.cpp or transformers) in its own process.

Standalone on purpose: it runs under the peer's own Python (llama.cpp's lives in
.venv-bench, without hayate) and imports nothing from hayate. It reads a JSON job on
stdin: {"engine", "model", "threads", "n_ctx", "prompts": {length: [ids]}, "decode_prompt":
[ids], "decode_tokens", "repeats"}, and prints one JSON line on stdout: {"load_s",
"ttft_s": {length: [s per repeat]}, "decode_token_times_s": [[instants per repeat]],
"decode_prompt_length"}, every instant in seconds after its request was submitted.
Both engines decode greedily and never stop at end-of-sequence, as hayate's bench does."""
from __future__ import annotations

import json
import os
import sys
import time

WARMUP_TOKENS = 8


class LlamaCppRunner:
    def __init__(self, job: dict):
        from llama_cpp import Llama

        threads = job["threads"]
        self.llm = Llama(model_path=job["model"], n_threads=threads, n_threads_batch=threads,
                         n_ctx=job["n_ctx"], verbose=False)

    def token_times(self, prompt: list[int], max_tokens: int) -> list[float]:
        # reset(): otherwise generate() reuses the cached prefix of the previous request.
        self.llm.reset()
        times = []
        start = time.perf_counter()
        # generate() yields each sampled token and, unlike create_completion, ignores EOS.
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            times.append(time.perf_counter() - start)
            if len(times) == max_tokens:
                break
        return times


class TransformersRunner:
    def __init__(self, job: dict):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(job["threads"])
        folder, name = os.path.split(job["model"])
        if job["model"].endswith(".gguf"):   # dequantized to fp32 on load
            self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        self.model.eval()
        self.torch = torch

    def token_times(self, prompt: list[int], max_tokens: int) -> list[float]:
        from transformers.generation.streamers import BaseStreamer

        class Recorder(BaseStreamer):
            """Notes when each new token is handed out (the first put() is the prompt)."""
            def __init__(self):
                self.puts: list[float] = []

            def put(self, value):
                self.puts.append(time.perf_counter())

            def end(self):
                pass

        recorder = Recorder()
        input_ids = self.torch.tensor([prompt])
        start = time.perf_counter()
        with self.torch.inference_mode():
            # min_new_tokens = max_new_tokens: end-of-sequence is masked, as ignore_eos does.
            self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                pad_token_id=0, streamer=recorder)
        return [instant - start for instant in recorder.puts[1:]]


RUNNERS = {"llama.cpp": LlamaCppRunner, "transformers": TransformersRunner}


def measure(runner, job: dict) -> dict:
    decode_prompt = job["decode_prompt"]
    runner.token_times(decode_prompt, min(job["decode_tokens"], WARMUP_TOKENS) + 1)   # warm-up
    ttft = {}
    for length, prompt in job["prompts"].items():
        ttft[length] = [runner.token_times(prompt, 1)[0] for _ in range(job["repeats"])]
        print(f"{job['engine']}: time to first token, {length} tokens: {min(ttft[length]) * 1e3:.0f} ms (best)",
              file=sys.stderr, flush=True)
    runs = [runner.token_times(decode_prompt, job["decode_tokens"] + 1) for _ in range(job["repeats"])]
    return {"ttft_s": ttft, "decode_token_times_s": runs, "decode_prompt_length": len(decode_prompt)}


def main() -> int:
    job = json.load(sys.stdin)
    start = time.perf_counter()
    runner = RUNNERS[job["engine"]](job)
    load_s = time.perf_counter() - start
    result = measure(runner, job)
    print(json.dumps({"load_s": load_s, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
