"""The command line: answers stream to stdout, mistakes give one line and exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hayate.cli import main
from hayate.loading.loader import default_model_path
from gguf_files import TINY_CONFIG, QType, write_model


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(capsys, *args: str, mentions: str) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hayate: error:"), err
    assert mentions in lines[0] and "Traceback" not in err


def test_missing_path(capsys, tmp_path):
    assert_usage_error(capsys, "run", "--model", str(tmp_path / "nope.gguf"), "hi", mentions="no such file")


def test_not_a_model_file(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some notes\n")
    assert_usage_error(capsys, "run", "--model", str(path), "hi", mentions="not a model")


def test_truncated_gguf(capsys, tmp_path):
    data = default_model_path().read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) // 3])
    assert_usage_error(capsys, "run", "--model", str(path), "hi", mentions="truncated.gguf")


def test_unsupported_gguf_architecture(capsys, tmp_path):
    path = write_model(tmp_path / "mamba.gguf", "mamba", TINY_CONFIG,
                       {"blk.0.ffn_up.weight": (np.zeros((4, 32), np.float32), QType.F32)})
    assert_usage_error(capsys, "run", "--model", str(path), "hi", mentions="mamba")


def test_unsupported_folder_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 8,'
                                          ' "intermediate_size": 8, "num_hidden_layers": 1,'
                                          ' "num_attention_heads": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_usage_error(capsys, "run", "--model", str(tmp_path), "hi", mentions="gpt_neox")


def test_folder_without_config(capsys, tmp_path):
    assert_usage_error(capsys, "run", "--model", str(tmp_path), "hi", mentions="config.json")


@pytest.mark.parametrize("option, value, field", [
    ("--max-tokens", "-1", "max_tokens"), ("--temperature", "-0.5", "temperature"),
    ("--top-p", "0", "top_p"), ("--threads", "0", "threads"), ("--weights", "int3", "weights")])
def test_invalid_options(capsys, option, value, field):
    if option == "--weights":  # argparse's own choices check: still exit code 2
        with pytest.raises(SystemExit) as exit_info:
            main(["run", option, value, "hi"])
        assert exit_info.value.code == 2
        return
    assert_usage_error(capsys, "run", option, value, "hi", mentions=field)


def test_run_streams_answer_and_summary():
    """The installed command, end to end, in its own process."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    process = subprocess.run(
        [sys.executable, "-m", "hayate.cli", "run", "--threads", "2", "--max-tokens", "12",
         "What is the capital of France?"], capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "Paris" in process.stdout
    summary = process.stderr.strip().splitlines()[-1]
    for part in ("prompt tokens", "time to first token", "tokens/s", "total"):
        assert part in summary


def test_run_says_its_share_of_the_floor_when_asked(capsys, monkeypatch):
    """--floor: hayate plan's floor on this machine (here a fixed profile, not the probe) and
    the decode's share of it, in the summary line; without it, nothing is probed."""
    from hayate.plan.hardware import HardwareProfile
    import hayate.server.floor

    probed = []
    machine = HardwareProfile("a test machine", bandwidth=1e12, flops=1e15)
    monkeypatch.setattr(hayate.server.floor, "machine_hardware", lambda device: probed.append(device) or machine)
    code, _, err = run_cli(capsys, "run", "--threads", "2", "--max-tokens", "8", "--floor", "hi")
    assert code == 0 and len(probed) == 1
    assert "of this machine's floor (" in err.strip().splitlines()[-1]
    code, _, err = run_cli(capsys, "run", "--threads", "2", "--max-tokens", "8", "hi")
    assert code == 0 and len(probed) == 1 and "floor" not in err


def test_chat_turns_reuse_the_conversation_from_the_prefix_cache(capsys, monkeypatch):
    """The default model: the second turn's prompt starts with the first turn, which is cached."""
    import builtins

    lines = iter(["Name a colour.", "And another one?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    code, _, err = run_cli(capsys, "chat", "--threads", "2", "--max-tokens", "8")
    assert code == 0
    summaries = [line for line in err.splitlines() if "time to first token" in line]
    assert len(summaries) == 2
    assert "cached" not in summaries[0] and "cached)" in summaries[1], summaries
