"""hayate/bench/background.py: the load runs inside the context and is gone after it, however
the body ends, and does not outlive a parent that dies without cleaning up."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from hayate.bench.background import background_load, start_load, stop_load

REPO = Path(__file__).resolve().parents[1]


def running(pid: int) -> bool:
    """Alive and not a zombie (a reaped or exited-unreaped process counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_none_starts_nothing():
    with background_load("none") as process:
        assert process is None


@pytest.mark.parametrize("kind, niceness", [("nice19", 19), ("busy", 0)])
def test_load_runs_inside_and_is_gone_after(kind, niceness):
    with background_load(kind) as process:
        assert process.poll() is None and running(process.pid)
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == min(19, own + niceness)
    assert process.returncode is not None and not running(process.pid)


def test_load_is_stopped_after_an_exception():
    with pytest.raises(KeyboardInterrupt):
        with background_load("busy") as process:
            assert running(process.pid)
            raise KeyboardInterrupt
    assert process.returncode is not None and not running(process.pid)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="background must be one of"):
        start_load("heavy")


def test_stop_load_is_idempotent():
    process = start_load("nice19")
    stop_load(process)
    stop_load(process)
    assert process.returncode is not None


def test_load_dies_with_its_parent():
    """A parent killed outright (no finally runs): the load follows it."""
    parent = textwrap.dedent("""
        import os, signal
        from hayate.bench.background import start_load
        load = start_load("nice19")
        print(load.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, cwd=REPO, timeout=60)
    load_pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 30   # a bound on a hang, not a speed threshold
    while running(load_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(load_pid)


# ---- hayate bench --background ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_model("llama", folder)
    return folder


@pytest.fixture
def watched_bench(monkeypatch):
    """hayate bench with its load recorded, whether it ran when the rounds began, and an error
    the rounds raise when one is put in the list."""
    from hayate.bench import command

    loads, running_in_rounds, rounds_error = [], [], []
    real_load, real_rounds = command.background_load, command.run_rounds

    @contextmanager
    def load(kind):
        with real_load(kind) as process:
            loads.append(process)
            yield process

    def rounds(*args, **kwargs):
        running_in_rounds.append(bool(loads) and loads[-1] is not None and loads[-1].poll() is None)
        if rounds_error:
            raise rounds_error[0]
        return real_rounds(*args, **kwargs)

    monkeypatch.setattr(command, "background_load", load)
    monkeypatch.setattr(command, "run_rounds", rounds)
    monkeypatch.setattr(command, "plan_floor", lambda *args: None)   # the CPU probe: not what is tested here
    return loads, running_in_rounds, rounds_error


BENCH = ["bench", "--threads", "1", "--prompt-lengths", "8", "--decode-tokens", "4", "--repeats", "1"]


def test_bench_measures_beside_the_load_and_records_it(tiny_folder, watched_bench, tmp_path):
    from hayate.cli import main

    loads, running_in_rounds, _ = watched_bench
    out_json = tmp_path / "bench.json"
    assert main([*BENCH, "--model", str(tiny_folder), "--background", "nice19", "--json", str(out_json)]) == 0
    assert running_in_rounds == [True]
    assert loads[0].returncode is not None and not running(loads[0].pid)
    data = json.loads(out_json.read_text())
    assert data["background"] == "nice19" and "nice 19" in data["background_load"]
    assert " online" in data["environment"]["usable_cpus"]


def test_bench_stops_the_load_on_ctrl_c(tiny_folder, watched_bench):
    from hayate.cli import main

    loads, running_in_rounds, rounds_error = watched_bench
    rounds_error.append(KeyboardInterrupt())
    assert main([*BENCH, "--model", str(tiny_folder), "--background", "busy"]) == 130
    assert running_in_rounds == [True] and not running(loads[0].pid)


def test_bench_default_is_no_load(tiny_folder, watched_bench, tmp_path):
    from hayate.cli import main

    loads, running_in_rounds, _ = watched_bench
    out_json = tmp_path / "bench.json"
    assert main([*BENCH, "--model", str(tiny_folder), "--json", str(out_json)]) == 0
    assert loads == [None] and running_in_rounds == [False]
    assert json.loads(out_json.read_text())["background"] == "none"


# ---- bench/serve_compare.py --background ------------------------------------------------

def serve_compare_module(monkeypatch):
    bench_folder = REPO / "bench"
    monkeypatch.syspath_prepend(str(bench_folder))   # serve_compare imports load from its folder
    spec = importlib.util.spec_from_file_location("bench_serve_compare", bench_folder / "serve_compare.py")
    compare = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_serve_compare", compare)
    spec.loader.exec_module(compare)
    return compare


def test_serve_compare_runs_every_level_beside_the_load(monkeypatch, tmp_path):
    compare = serve_compare_module(monkeypatch)
    loads, running_in_levels = [], []
    real_load = compare.background_load

    @contextmanager
    def load(kind):
        with real_load(kind) as process:
            loads.append(process)
            yield process

    async def fake_benchmark(config, progress):
        running_in_levels.append(loads[-1].poll() is None)
        spread = {"p50": 1.0, "p90": 1.0, "p99": 1.0}
        return {"levels": [{"concurrency": config.concurrency_levels[0], "output_tokens_per_s": 1.0,
                            "errors": 0, "ttft_ms": spread, "itl_ms": spread}]}

    monkeypatch.setattr(compare, "background_load", load)
    monkeypatch.setattr(compare, "run_benchmark", fake_benchmark)
    monkeypatch.setattr(compare, "format_table", lambda report: "")
    monkeypatch.setattr(compare, "start_servers", lambda names, *rest: {
        name: compare.ServerSpec(name, [], {}, 1) for name in names})
    model, out_json = tmp_path / "m.gguf", tmp_path / "compare.json"
    model.write_bytes(b"")
    assert compare.main(["--model", str(model), "--concurrency", "1,2", "--background", "nice19",
                         "--log-dir", str(tmp_path), "--json", str(out_json)]) == 0
    assert running_in_levels == [True] * 4 and not running(loads[0].pid)
    assert json.loads(out_json.read_text())["background"] == "nice19"
