"""hayate serve --ray --replicas 2 --threads 1 on the default model, on this machine's Ray: the
official client, the status routes through the ingress, a replica killed mid-stream, prefix
routing. Skipped unless Ray Serve is installed (`make test-ray`)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from test_ray_serve import KEY, MODEL

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayServer:
    """`hayate serve --ray` in a subprocess of its own session, so the whole Ray tree can be
    found (its descendants) and stopped."""

    def __init__(self, tmp_path: Path, *options: str):
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        command = [sys.executable, "-m", "hayate.cli", "serve", "--ray", "--replicas", "2", "--threads", "1",
                   "--port", str(self.port), "--api-key", KEY, *options]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Until every replica is up: /health answers 200 as soon as one can serve, the CLI
        logs "serving on" once serve.run has brought up all of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]
            if "serving on http" in self.log.read_text(errors="replace"):
                assert httpx.get(f"{self.url}/health", timeout=10).status_code == 200
                return
            time.sleep(1)
        raise TimeoutError(f"not ready in {timeout} s: {self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def post(self, body: dict, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=auth(), timeout=120, **kwargs)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def chat(content: str, max_tokens: int = 8, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **fields}


def replica_pid(response: httpx.Response) -> int:
    return int(response.headers["x-hayate-replica"].rsplit("/", 1)[1])


@pytest.fixture(scope="class")
def ray_server(request, tmp_path_factory):
    pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    server = RayServer(tmp_path_factory.mktemp("ray"), *getattr(request.cls, "serve_options", ()))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
class TestReplicas:
    def test_the_official_client_gets_answers_streamed_and_whole(self, ray_server):
        client = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        whole = client.chat.completions.create(**chat("Say hello."))
        assert whole.choices[0].message.content and whole.usage.completion_tokens == 8
        chunks = list(client.chat.completions.create(**chat("Say hello."), stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content

    def test_both_replicas_serve_and_status_routes_pass_the_ingress(self, ray_server):
        replicas = {ray_server.post(chat(f"Count to {i}.", max_tokens=2)).headers["x-hayate-replica"]
                    for i in range(16)}
        assert len(replicas) == 2
        assert httpx.post(f"{ray_server.url}/v1/chat/completions", json=chat("hi")).status_code == 401
        assert httpx.get(f"{ray_server.url}/health").json()["status"] == "ok"     # no key needed
        models = httpx.get(f"{ray_server.url}/v1/models", headers=auth()).json()
        assert models["data"][0]["id"] == MODEL
        metrics = httpx.get(f"{ray_server.url}/metrics", headers=auth())
        assert metrics.status_code == 200 and "x-hayate-replica" in metrics.headers   # one replica's own

    def test_a_killed_replica_ends_its_streams_with_an_error_and_new_requests_succeed(self, ray_server):
        streams = [StreamReader(ray_server, f"Tell a long story about the number {i}.") for i in range(4)]
        for stream in streams:
            assert stream.started.wait(120), stream.error
        victim = streams[0].pid
        os.kill(victim, signal.SIGKILL)
        after = [None] * 8

        def send(index: int) -> None:
            after[index] = ray_server.post(chat(f"Question {index}?", max_tokens=4, stream=index % 2 == 1))
        senders = [threading.Thread(target=send, args=(i,)) for i in range(len(after))]
        for thread in senders:
            thread.start()
        for thread in senders + [s.thread for s in streams]:
            thread.join(180)
        assert [response.status_code for response in after] == [200] * len(after)
        assert all(replica_pid(response) != victim for response in after)
        for stream in streams:
            assert stream.events[-1] == "[DONE]", stream.events[-3:]
            ended = json.loads(stream.events[-2])
            if stream.pid == victim:
                assert ended["error"]["code"] == "replica_lost"
            else:
                assert "error" not in ended
        replicas = wait_for_replacement(ray_server, {stream.pid for stream in streams})
        assert victim not in replicas


class StreamReader:
    """A long streamed request read on a thread: its replica's pid and its SSE data lines."""

    def __init__(self, server: RayServer, content: str):
        self.server, self.content = server, content
        self.started, self.events, self.pid, self.error = threading.Event(), [], None, None
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        body = chat(self.content, max_tokens=400, stream=True, ignore_eos=True)
        try:
            with httpx.stream("POST", f"{self.server.url}/v1/chat/completions", json=body, headers=auth(),
                              timeout=180) as response:
                self.pid = replica_pid(response)
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                        self.started.set()
        except httpx.HTTPError as error:
            self.error = repr(error)
            self.started.set()


def wait_for_replacement(server: RayServer, old_pids: set[int], timeout: float = 180.0) -> set[int]:
    """The replica pids seen answering once a new one (not in `old_pids`) has appeared."""
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        response = server.post(chat("ping", max_tokens=1))
        assert response.status_code == 200
        seen.add(replica_pid(response))
        if seen - old_pids:
            return seen
    raise AssertionError(f"no replacement replica answered in {timeout} s (seen {seen})")


@pytest.mark.slow
class TestPrefixRouting:
    serve_options = ("--routing", "prefix")

    def test_conversations_sharing_a_prefix_go_to_one_replica(self, ray_server):
        """Nearly all: Ray still moves a request on when the preferred replica's queue-length
        probe misses its deadline (a random router keeps 7 of 8 together 7% of the time)."""
        for topic in ("a lighthouse", "the sea", "a train", "the moon"):
            system = f"You only talk about {topic}. " * 20    # past the key's length
            served = [ray_server.post({**chat(f"Question {i}?", max_tokens=2),
                                       "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": f"Question {i}?"}]}
                                      ).headers["x-hayate-replica"] for i in range(8)]
            home = max(set(served), key=served.count)
            assert served.count(home) >= 7, (topic, served)
