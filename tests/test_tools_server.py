"""Tool calling through hayate serve, on a tiny random model that speaks Qwen2.5's format
(tests/tool_models.py), with the official `openai` client: the grammar makes every call
valid whatever the weights; tool_choice none makes none even when the logits push for one."""
import json
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from hayate.llm import LLM
from hayate.sampling import SamplingParams
from server_harness import tiny_server
from tiny_models import make_tiny_model
from tool_models import make_tool_model

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -9, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_CALL_TOKEN = 260   # <tool_call> in the tiny model's vocabulary (tests/tool_models.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tool_model(tmp_path_factory.mktemp("tiny-tools"))


@pytest.fixture(scope="module")
def server(folder):
    running = tiny_server(folder)
    yield running
    running.stop()


def ask(client, model, seed: int, **options):
    options = {"messages": ASK, "tools": TOOLS, "temperature": 1.0, "max_tokens": 300, **options}
    return client.chat.completions.create(model=model, seed=seed, **options)


def assert_valid_calls(choice, names=("get_weather", "add")) -> None:
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_gives_30_of_30_valid_calls(client, model):
    for seed in range(30):
        choice = ask(client, model, seed, tool_choice="required", parallel_tool_calls=False).choices[0]
        assert_valid_calls(choice)
        assert len(choice.message.tool_calls) == 1


def test_a_named_tool_gives_30_of_30_valid_calls_to_it(client, model):
    named = {"type": "function", "function": {"name": "add"}}
    for seed in range(30):
        choice = ask(client, model, seed, tool_choice=named, parallel_tool_calls=False).choices[0]
        assert_valid_calls(choice, names=("add",))
        assert len(choice.message.tool_calls) == 1


def test_parallel_calls_are_each_valid(client, model):
    made = 0
    for seed in range(5):
        choice = ask(client, model, seed, tool_choice="required", max_tokens=1000).choices[0]
        if choice.finish_reason == "tool_calls":   # a random model may go on calling to max_tokens
            assert_valid_calls(choice)
            made += len(choice.message.tool_calls)
    assert made >= 1


def test_auto_pushed_to_call_makes_valid_calls_and_pushed_away_answers_text(client, model):
    for seed in range(30):
        pushed = ask(client, model, seed, tool_choice="auto", parallel_tool_calls=False,
                     logit_bias={str(TOOL_CALL_TOKEN): 100}).choices[0]
        assert_valid_calls(pushed)
    for seed in range(5):
        away = ask(client, model, seed, max_tokens=20, logit_bias={str(TOOL_CALL_TOKEN): -100}).choices[0]
        assert away.message.tool_calls is None and away.finish_reason in ("stop", "length")


def test_none_makes_no_call_even_when_the_logits_push_for_one(client, model):
    for seed in range(30):
        choice = ask(client, model, seed, tool_choice="none", max_tokens=24,
                     logit_bias={str(TOOL_CALL_TOKEN): 100}).choices[0]
        assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
        assert "<tool_call>" not in choice.message.content


def test_max_tokens_cut_inside_a_call_is_length_without_tool_calls(client, model):
    for stream in (False, True):
        response = ask(client, model, 0, tool_choice="required", max_tokens=8, stream=stream)
        if stream:
            chunks = list(response)
            assert chunks[-1].choices[0].finish_reason == "length"
            continue
        choice = response.choices[0]
        assert choice.finish_reason == "length" and choice.message.tool_calls is None
        assert choice.message.content.startswith("<tool_call>")


def test_streamed_deltas_are_shaped_as_openai_sends_them(client, model):
    options = {"tool_choice": "required", "max_tokens": 1000}
    whole = ask(client, model, 3, **options).choices[0]
    chunks = list(ask(client, model, 3, stream=True, **options))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            if delta.index not in calls:   # first delta of a call: id, type, name, arguments ""
                assert delta.id.startswith("call_") and delta.type == "function"
                assert delta.function.name and delta.function.arguments == ""
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.type is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
        assert not (chunk.choices and chunk.choices[0].delta.content)
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    if whole.finish_reason == "tool_calls":
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (call.function.name, call.function.arguments) for call in whole.message.tool_calls]


class GetWeather(BaseModel):
    city: str = Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]


def test_the_official_stream_helper_yields_parsed_arguments(client, model):
    with client.chat.completions.stream(model=model, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
                                        tool_choice="required", parallel_tool_calls=False, seed=1,
                                        temperature=1.0, max_tokens=300) as stream:
        done = [event for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert len(done) == 1 and done[0].name == "GetWeather"
    assert isinstance(done[0].parsed_arguments, GetWeather)
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments, GetWeather)


def test_a_tool_result_round_trip_answers_on_the_next_turn(client, model, server):
    first = ask(client, model, 5, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                parallel_tool_calls=False).choices[0]
    call = first.message.tool_calls[0]
    history = ASK + [first.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    answer = ask(client, model, 6, messages=history, max_tokens=16,
                 logit_bias={str(TOOL_CALL_TOKEN): -100}).choices[0]
    assert answer.message.content and answer.message.tool_calls is None
    prompt = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": history, "tools": TOOLS, "max_tokens": 1, "return_token_ids": True}).json()
    text = server.state.model.tokenizer.decode(prompt["prompt_token_ids"], skip_special_tokens=False)
    arguments = json.loads(call.function.arguments)
    assert f'"arguments": {json.dumps(arguments, ensure_ascii=False)}' in text   # an object, not a string
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tools_are_refused_with_400_naming_the_field_quickly(server, model, body, param):
    elapsed = []
    for _ in range(3):
        begin = time.perf_counter()
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                              json={"model": model, "messages": ASK, **body})
        elapsed.append(time.perf_counter() - begin)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
    print(f"\n400 for {param} in {min(elapsed) * 1000:.1f} ms")
    assert min(elapsed) < 5   # a hang guard; the time is printed (tens of ms here)


def test_the_llm_api_returns_parsed_calls(folder):
    llm = LLM(str(folder))
    result = llm.chat(ASK, SamplingParams(temperature=1.0, seed=0, max_tokens=300), tools=TOOLS,
                      tool_choice="required", parallel_tool_calls=False)
    assert result.finish_reason == "tool_calls" and len(result.tool_calls) == 1
    jsonschema.validate(json.loads(result.tool_calls[0].arguments), SCHEMAS[result.tool_calls[0].name])
    plain = llm.chat(ASK, SamplingParams(max_tokens=4))
    assert plain.tool_calls == []


def test_a_template_without_tools_gets_the_json_envelope(tmp_path):
    folder = tmp_path / "plain"
    make_tiny_model("qwen2", folder)   # ChatML without tools, like SmolLM2's
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    llm = LLM(str(folder))
    assert llm.tool_setup.format.name == "json" and not llm.tool_setup.native
    prompt = llm.tokenizer.decode(llm.prepare_chat(ASK, tools=llm.tool_plan(TOOLS, "required")).token_ids, False)
    assert '{"name": "get_weather"' in prompt and '{"tool_calls": [' in prompt
    for seed in range(5):
        result = llm.chat(ASK, SamplingParams(temperature=1.0, seed=seed, max_tokens=400), tools=TOOLS,
                          tool_choice="required", parallel_tool_calls=False)
        assert result.finish_reason == "tool_calls" and result.text.startswith('{"tool_calls": [')
        jsonschema.validate(json.loads(result.tool_calls[0].arguments), SCHEMAS[result.tool_calls[0].name])
