"""Run peer_worker.py for llama.cpp (in .venv-bench) and transformers (in hayate's venv),
one process each, one after the other, and read back their timings."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hayate.bench.timings import EngineResult, RawTimings, failed, summarize

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
    """One peer's run: the command that starts its worker and the job it reads on stdin."""
    name: str
    command: list[str]
    env: dict[str, str]
    job: dict


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


def peer_job(name: str, base_job: dict, llama_python: Path, full: bool) -> PeerJob:
    """llama.cpp: pinned OpenMP threads (unpinned, its workers spin against each other).
    transformers: decode tokens capped and long prompts left out unless `full`."""
    job = {**base_job, "engine": name}
    if name == "llama.cpp":
        return PeerJob(name, [str(llama_python), str(WORKER)], {"OMP_PROC_BIND": "true"}, job)
    if not full:
        job["decode_tokens"] = min(job["decode_tokens"], TRANSFORMERS_DECODE_CAP)
        job["prompts"] = {length: ids for length, ids in job["prompts"].items()
                          if int(length) <= TRANSFORMERS_MAX_PROMPT}
    env = {"OMP_NUM_THREADS": str(job["threads"])}
    return PeerJob(name, [sys.executable, str(WORKER)], env, job)


def peer_environment() -> dict[str, str]:
    """This process's environment without the libgomp setting hayate itself chose (see
    hayate/__init__.py): a peer runs as its users run it."""
    env = dict(os.environ)
    if env.pop("HAYATE_SET_GOMP_SPINCOUNT", None):
        env.pop("GOMP_SPINCOUNT", None)
    return env


def run_peer(peer: PeerJob, timeout_s: float, echo: Callable[[str], None] | None = None) -> RawTimings:
    """Start the worker in its own process group (killed on timeout or interrupt, so nothing
    is left running) and parse its last JSON line. Its progress lines go to `echo`."""
    stderr_tail: deque[str] = deque(maxlen=20)
    with tempfile.TemporaryFile("w+") as job_file, tempfile.TemporaryFile("w+") as stdout_file:
        json.dump(peer.job, job_file)
        job_file.seek(0)
        process = subprocess.Popen(peer.command, stdin=job_file, stdout=stdout_file, stderr=subprocess.PIPE,
                                   text=True, env={**peer_environment(), **peer.env}, start_new_session=True)
        reader = threading.Thread(target=_follow_stderr, args=(process, peer.name, stderr_tail, echo), daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PeerFailed(f"no result after {timeout_s:.0f} s (stopped)") from None
        finally:
            _kill_group(process)
            reader.join(timeout=5)
        stdout_file.seek(0)
        stdout = stdout_file.read()
    stderr = "\n".join(stderr_tail)
    if process.returncode != 0:
        raise PeerFailed(f"exited with code {process.returncode}: {last_line(stderr)}")
    return parse_output(stdout, stderr)


def _follow_stderr(process: subprocess.Popen, name: str, tail: deque[str],
                   echo: Callable[[str], None] | None) -> None:
    for line in process.stderr:
        tail.append(line.rstrip())
        if echo is not None and line.startswith(f"{name}:"):
            echo(line.rstrip())


def parse_output(stdout: str, stderr: str = "") -> RawTimings:
    """The last stdout line that is a JSON object holds the timings."""
    for line in reversed(stdout.strip().splitlines()):
        if line.lstrip().startswith("{"):
            try:
                return RawTimings.from_json(json.loads(line))
            except (json.JSONDecodeError, ValueError) as error:
                raise PeerFailed(f"unreadable result: {error}") from None
    raise PeerFailed(f"printed no result: {last_line(stderr)}")


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


def measure_peer(peer: PeerJob, timeout_s: float, echo: Callable[[str], None] | None = None) -> EngineResult:
    try:
        return summarize(peer.name, run_peer(peer, timeout_s, echo))
    except (PeerFailed, OSError) as error:
        return failed(peer.name, str(error))
