"""Structured output over HTTP on a tiny random model: OpenAI's response_format, vLLM's
structured_outputs and guided_* fields, the official client's parse(), and hostile grammars
refused with a 400 before any token while the server keeps serving."""
from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pydantic
import pytest

from server_harness import tiny_server
from structured_schemas import SCHEMAS
from tiny_models import make_tiny_model

MODEL = "tiny-structured-server"
PERSON = SCHEMAS[0]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp(MODEL, numbered=False)
    make_tiny_model("llama", folder)
    running = tiny_server(folder)
    yield running
    running.stop()


def chat(server, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": HI, "max_tokens": 150, "seed": 3, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def test_response_format_json_schema(server):
    response = chat(server, n=3, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}})
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
        assert choice["finish_reason"] == "stop"


def test_streamed_json_schema_concatenates_to_the_same_answer(server):
    fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
    whole = chat(server, **fields).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": HI, "max_tokens": 150, "seed": 3, "stream": True, **fields}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object(server):
    response = chat(server, max_tokens=60, response_format={"type": "json_object"})
    content = response.json()["choices"][0]
    assert content["message"]["content"].startswith("{")
    if content["finish_reason"] == "stop":
        assert isinstance(json.loads(content["message"]["content"]), dict)


@pytest.mark.parametrize("fields, check", [
    ({"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}, lambda t: re.fullmatch("[a-z]{3}-[0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ({"structured_outputs": {"grammar": 'start: "n=" /[0-9]{1,2}/'}}, lambda t: re.fullmatch("n=[0-9]{1,2}", t)),
    ({"structured_outputs": {"json": PERSON}}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ({"guided_regex": "[0-9]{4}"}, lambda t: re.fullmatch("[0-9]{4}", t)),
])
def test_vllm_fields_in_chat_and_completions(server, fields, check):
    response = chat(server, **fields)
    assert response.status_code == 200, response.text
    assert check(response.json()["choices"][0]["message"]["content"])
    completion = httpx.post(f"{server.url}/v1/completions", timeout=60,
                            json={"model": MODEL, "prompt": "go", "max_tokens": 150, **fields})
    assert completion.status_code == 200, completion.text
    choice = completion.json()["choices"][0]
    assert check(choice["text"]) and choice["finish_reason"] == "stop"


class Pet(pydantic.BaseModel):
    kind: str = pydantic.Field(max_length=4)
    legs: int = pydantic.Field(ge=0, le=8)


def test_openai_client_parse_returns_the_model(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    completion = client.chat.completions.parse(model=MODEL, messages=HI, response_format=Pet, max_tokens=150, seed=1)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Pet) and 0 <= parsed.legs <= 8


HOSTILE = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                 "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": list(range(5000))}}}},
     "response_format", "enum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": list(range(100000))}}}},
     "response_format", "limit"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "((a{1000}){1000}){1000}"}}}}, "response_format", "repetitions"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}, "response_format", "object"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"structured_outputs": {"regex": "(a|aa)*(b|" * 300}}, "structured_outputs", ""),
    ({"structured_outputs": {"regex": "((a{1000}){1000}){1000}"}}, "structured_outputs", "repetitions"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs", ""),
    ({"guided_choice": ["x"] * 5000}, "guided_choice", "limit"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "combined"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "combined"),
]


@pytest.mark.parametrize("fields, param, words", HOSTILE)
def test_hostile_grammars_are_refused_quickly(server, fields, param, words):
    started = time.perf_counter()
    response = chat(server, **fields)
    elapsed = time.perf_counter() - started
    print(f"{param}: 400 in {elapsed * 1000:.1f} ms")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert "\n" not in error["message"]
    assert elapsed < 1.0   # the issue asks 100 ms; generous here, the measured time is printed
    assert chat(server, max_tokens=2).status_code == 200   # and the server goes on serving
