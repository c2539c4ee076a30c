"""Start peer_worker.py for llama.cpp (in .venv-bench) and transformers (in hayate's venv),
one process each, loaded once; the bench then asks each for timings, request by request,
taking turns with hayate (rounds.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PEERS = ("llama.cpp", "transformers")
WORKER = Path(__file__).with_name("peer_worker.py")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_LLAMA_PYTHON = REPO / ".venv-bench" / "bin" / "python"
TRANSFORMERS_DECODE_CAP = 64       # ~20-26 tokens/s here: keep its share of the run short
TRANSFORMERS_MAX_PROMPT = 512


class PeerFailed(Exception):
    """A peer that crashed, timed out or printed no timings; the message is one line."""


@dataclass
class PeerJob:
    """One peer: the command that starts its worker, the job it loads, and its share of
    the measurements (transformers is slow: fewer decode tokens, shorter prompts)."""
    name: str
    command: list[str]
    env: dict[str, str]
    job: dict
    decode_tokens: int
    max_prompt: int | None = None


def parse_selection(text: str | None) -> list[str]:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise ValueError(f"--compare: unknown engine {unknown[0]!r}; choose from {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def environment_problem(name: str, model_path: Path, llama_python: Path) -> str | None:
    """Why this peer cannot run here, in one line; None when it can."""
    if name == "llama.cpp":
        if model_path.suffix != ".gguf":
            return "llama.cpp needs a .gguf file"
        if not llama_python.exists():
            return f"its environment {llama_python} is missing: run `make bench-env`"
    if name == "transformers":
        missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed in {sys.executable}"
    return None


def peer_job(name: str, base_job: dict, decode_tokens: int, llama_python: Path, full: bool) -> PeerJob:
    """llama.cpp: pinned OpenMP threads (unpinned, its workers spin against each other).
    transformers: decode tokens capped and long prompts left out unless `full`."""
    job = {**base_job, "engine": name}
    if name == "llama.cpp":
        return PeerJob(name, [str(llama_python), str(WORKER)], {"OMP_PROC_BIND": "true"}, job, decode_tokens)
    env = {"OMP_NUM_THREADS": str(job["threads"])}
    if full:
        return PeerJob(name, [sys.executable, str(WORKER)], env, job, decode_tokens)
    return PeerJob(name, [sys.executable, str(WORKER)], env, job, min(decode_tokens, TRANSFORMERS_DECODE_CAP),
                   TRANSFORMERS_MAX_PROMPT)


def peer_environment() -> dict[str, str]:
    """This process's environment without the libgomp setting hayate itself chose (see
    hayate/__init__.py): a peer runs as its users run it."""
    env = dict(os.environ)
    if env.pop("HAYATE_SET_GOMP_SPINCOUNT", None):
        env.pop("GOMP_SPINCOUNT", None)
    return env


class PeerProcess:
    """A peer's worker, loaded once and asked for one request's token times at a time.

    It runs in its own process group, killed by close() (and on any failure), so nothing is
    left running. `timeout_s` bounds the peer's whole life in the bench, loading included;
    every failure (a crash, a timeout, an unreadable answer) is a PeerFailed in one line."""

    def __init__(self, peer: PeerJob, timeout_s: float, echo: Callable[[str], None] | None = None):
        self.name, self.decode_tokens, self.max_prompt = peer.name, peer.decode_tokens, peer.max_prompt
        self.timeout_s, self.deadline = timeout_s, time.monotonic() + timeout_s
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.answers: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(peer.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
                                        env={**peer_environment(), **peer.env})
        self.stderr_reader = threading.Thread(target=_follow_stderr, daemon=True,
                                              args=(self.process, peer.name, self.stderr_tail, echo))
        self.stderr_reader.start()
        threading.Thread(target=self._read_answers, daemon=True).start()
        try:
            ready = self._call(peer.job)
            if ready.get("ready") is not True:
                raise PeerFailed(f"unreadable answer to its job: {json.dumps(ready)[:120]}")
            self.load_s = float(ready.get("load_s") or 0.0)
        except (PeerFailed, TypeError, ValueError) as error:
            self.close()
            raise PeerFailed(str(error)) from None

    def accepts(self, prompt_length: int) -> bool:
        return self.max_prompt is None or prompt_length <= self.max_prompt

    def token_times(self, prompt: list[int], max_tokens: int) -> list[float]:
        """Arrival of each generated token, seconds after the request began."""
        return self.generate(prompt, max_tokens)[0]

    def generate(self, prompt: list[int], max_tokens: int, stop: list[int] = ()) -> tuple[list[float], list[int]]:
        """Arrival of each generated token (seconds after the request began) and the tokens;
        greedy, to max_tokens or a token of `stop` (llama.cpp's worker only)."""
        answer = self._call({"prompt": prompt, "max_tokens": max_tokens, **({"stop": list(stop)} if stop else {})})
        try:
            times = [float(t) for t in answer.get("times")]
            tokens = [int(t) for t in answer.get("tokens")]
        except (TypeError, ValueError):
            times, tokens = [], []
        if not times:
            self.close()
            raise PeerFailed(f"answered without token times for a {len(prompt)}-token prompt")
        return times, tokens

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        _kill_group(self.process)

    def _read_answers(self) -> None:
        for line in self.process.stdout:
            self.answers.put(line)
        self.answers.put(None)    # end of stdout: the worker is gone

    def _call(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass    # a dead worker: the missing answer says why
        try:
            line = self.answers.get(timeout=max(self.deadline - time.monotonic(), 0.0))
        except queue.Empty:
            self.close()
            raise PeerFailed(f"no result after {self.timeout_s:.0f} s (stopped)") from None
        if line is None:    # its stdout closed: it is exiting; its code and last words say why
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.close()
            self.stderr_reader.join(timeout=5)
            raise PeerFailed(f"exited with code {self.process.returncode}: {last_line(chr(10).join(self.stderr_tail))}")
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            self.close()
            raise PeerFailed(f"unreadable answer: {line.strip()[:120]}")
        return answer


def _follow_stderr(process: subprocess.Popen, name: str, tail: deque[str],
                   echo: Callable[[str], None] | None) -> None:
    for line in process.stderr:
        tail.append(line.rstrip())
        if echo is not None and line.startswith(f"{name}:"):
            echo(line.rstrip())


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the worker's own process group (it and anything it started)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
