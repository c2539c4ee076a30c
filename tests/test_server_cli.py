"""`hayate serve` as a user runs it: the default model through the official openai package,
a graceful SIGTERM (in-flight streams finish, exit status 0), and one-line start-up errors."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from hayate.cli import main

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not become healthy (exit status {process.poll()})")


@pytest.fixture
def default_model_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "hayate.cli", "serve", "--port", str(port),
                                "--threads", "2", "--max-batch", "4", "--log-level", "warning"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        log.seek(0)
        print(log.read())
        log.close()


def test_default_model_with_openai_client_then_graceful_sigterm(default_model_server):
    process, url = default_model_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    answer = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.completion_time > 0 and answer.usage.prompt_tokens > 5

    chunks, first_chunk = [], threading.Event()

    def read_stream() -> None:
        for chunk in client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                                    max_tokens=24, stream=True):
            chunks.append(chunk)
            first_chunk.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert first_chunk.wait(60)
    process.send_signal(signal.SIGTERM)
    reader.join(60)
    assert process.wait(60) == 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(answer.choices[0].message.content)   # the in-flight stream was finished
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health")


def test_missing_model_is_one_line_exit_2(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "nope.gguf"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hayate: error:") and "no such file" in err[0]


def test_bad_options_are_one_line_exit_2(capsys):
    for options in (["--max-batch", "0"], ["--max-queue", "0"], ["--max-n", "0"], ["--api-key", ""]):
        assert main(["serve", *options, "--port", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hayate: error:"), options


def test_model_that_fails_to_load_stops_the_server(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    assert main(["serve", "--model", str(notes), "--port", "0", "--log-level", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hayate: error: could not load the model") and "not a model" in err[-1]


def test_api_keys_from_options_and_environment(monkeypatch):
    from hayate.cli import build_parser
    from hayate.serve import api_keys

    monkeypatch.setenv("HAYATE_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b", "--api-key", "a"])
    assert api_keys(args) == ("a", "b", "from-env")
    monkeypatch.delenv("HAYATE_API_KEY")
    assert api_keys(build_parser().parse_args(["serve"])) == ()
