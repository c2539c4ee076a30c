"""Serve timing requests for one peer engine (llama.cpp or transformers) in its own process.

Standalone on purpose: it runs under the peer's own Python (llama.cpp's lives in
.venv-bench, without hayate) and imports nothing from hayate. It stays loaded for the whole
bench, so that hayate and the peers can take turns, round after round, and a change in the
machine's speed (these VMs have phases) moves every engine's figures alike.

Protocol, one JSON object a line: the first line on stdin is the job {"engine", "model",
"threads", "n_ctx"} (llama.cpp's may add "prompt_lookup": {"num_pred_tokens",
"max_ngram_size"}: llama-cpp-python's own prompt-lookup speculative decoding); once loaded
the worker answers {"ready": true, "load_s"}. Each further line is a request {"prompt": [ids],
"max_tokens": n} (llama.cpp's may add "stop": [ids]), answered {"times": [s, ...], "tokens":
[ids]}: the arrival of each generated token in seconds after the request began, and the
tokens. Both engines decode greedily and never stop at end-of-sequence, as hayate's bench
does, unless a request names its stop tokens (which end it, the stop token included). End of
stdin ends it.
Answers go to a private copy of stdout; file descriptor 1 itself points at stderr, so that
nothing a library prints can be mistaken for an answer."""
from __future__ import annotations

import json
import os
import sys
import time


class LlamaCppRunner:
    def __init__(self, job: dict):
        from llama_cpp import Llama

        threads = job["threads"]
        draft = None
        if job.get("prompt_lookup"):
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(**job["prompt_lookup"])
        # With a draft model Llama keeps every position's logits, but sizes their array by
        # logits_all: without it a prompt longer than n_batch fails to broadcast (0.3.36).
        self.llm = Llama(model_path=job["model"], n_threads=threads, n_threads_batch=threads,
                         n_ctx=job["n_ctx"], draft_model=draft, logits_all=draft is not None, verbose=False)

    def token_times(self, prompt: list[int], max_tokens: int, stop=()) -> tuple[list[float], list[int]]:
        # reset(): otherwise generate() reuses the cached prefix of the previous request.
        self.llm.reset()
        times, tokens = [], []
        start = time.perf_counter()
        # generate() yields each sampled token and, unlike create_completion, ignores EOS.
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            times.append(time.perf_counter() - start)
            tokens.append(int(token))
            if len(times) == max_tokens or token in stop:
                break
        return times, tokens


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

    def token_times(self, prompt: list[int], max_tokens: int, stop=()) -> tuple[list[float], list[int]]:
        from transformers.generation.streamers import BaseStreamer

        class Recorder(BaseStreamer):
            """Notes when each new token is handed out (the first put() is the prompt)."""
            def __init__(self):
                self.puts: list[float] = []
                self.tokens: list[int] = []

            def put(self, value):
                self.puts.append(time.perf_counter())
                self.tokens += [int(t) for t in value.reshape(-1).tolist()]

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
        return [instant - start for instant in recorder.puts[1:]], recorder.tokens[len(prompt):]


RUNNERS = {"llama.cpp": LlamaCppRunner, "transformers": TransformersRunner}


def protocol_channel():
    """A private stream for answers; fd 1 (Python's and C libraries' stdout) then goes to stderr."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def answer(channel, message: dict) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def main() -> int:
    channel = protocol_channel()
    job = json.loads(sys.stdin.readline())
    start = time.perf_counter()
    runner = RUNNERS[job["engine"]](job)
    answer(channel, {"ready": True, "load_s": time.perf_counter() - start})
    for line in sys.stdin:
        if line.strip():
            request = json.loads(line)
            times, tokens = runner.token_times(request["prompt"], request["max_tokens"], set(request.get("stop", ())))
            answer(channel, {"times": times, "tokens": tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
