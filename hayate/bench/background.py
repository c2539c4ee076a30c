"""A bounded background load for the benches: one pure-Python busy loop in a child process,
at nice 19 ("nice19") or at this process's own priority ("busy"), so that the speed of an
engine sharing a core can be measured (`hayate bench --background`, bench/serve_compare.py).

The load never outlives the bench: background_load stops it on the way out (an error or
Ctrl-C included), the kernel signals it when its parent dies (PR_SET_PDEATHSIG, on Linux),
and it checks every few milliseconds that its parent is still the one that started it."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

BACKGROUNDS = ("none", "nice19", "busy")
DESCRIPTIONS = {"none": "none", "nice19": "one busy-loop process at nice 19",
                "busy": "one busy-loop process at normal priority"}
STOP_GRACE_S = 5

# argv: the parent's pid, the niceness to add. Ctrl-C is the parent's to handle (it stops the
# load); "ready" once niced, so no measurement starts before the load does. The death signal
# comes when the thread that started the load ends: start it from the bench's main thread.
LOAD_SOURCE = """
import ctypes, os, signal, sys
parent, niceness = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if niceness:
    os.nice(niceness)
print("ready", flush=True)
while os.getppid() == parent:
    for _ in range(100000):
        pass
"""


def start_load(kind: str) -> subprocess.Popen:
    """The load process of `kind` ("nice19" or "busy"), running once this returns."""
    if kind not in BACKGROUNDS[1:]:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {kind!r}")
    niceness = 19 if kind == "nice19" else 0
    process = subprocess.Popen([sys.executable, "-c", LOAD_SOURCE, str(os.getpid()), str(niceness)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline().strip()
    finally:
        process.stdout.close()
    if ready != "ready":
        stop_load(process)
        raise OSError(f"the {kind} background load did not start (exit code {process.returncode})")
    return process


def stop_load(process: subprocess.Popen) -> None:
    """Terminate the load, then kill it if it lingers; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def background_load(kind: str) -> Iterator[subprocess.Popen | None]:
    """Run the body with the `kind` of load beside it ("none": nothing), stopped on the way out."""
    if kind == "none":
        yield None
        return
    process = start_load(kind)
    try:
        yield process
    finally:
        stop_load(process)
