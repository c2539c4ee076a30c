"""Tool-call formats, the output parser and its streaming twin, and the tool grammars walked
with llguidance directly (no model): every walk the grammar allows parses into valid calls."""
import json
import random
import time

import jsonschema
import llguidance
import numpy as np
import pytest
from tokenizers import AddedToken

from hayate.config import EngineConfig
from hayate.tools import (FORMATS, CallSyntax, ToolCallStream, ToolRequestError, detect_format, parse_output,
                          parse_tool_choice, parse_tools, tool_plan, tool_setup)
from hayate.tools.grammar import call_schema, tool_grammar
from hayate.tools.parser import MAX_CALLS
from hayate.tools.prompt import template_messages
from tiny_models import byte_tokenizer
from tool_models import QWEN25_TOOLS_TEMPLATE

HERMES = CallSyntax.of(FORMATS["hermes"])
JSON_ENVELOPE = CallSyntax.of(FORMATS["json"])
MISTRAL = CallSyntax.of(FORMATS["mistral"], frozenset({"[TOOL_CALLS]"}))   # decoding skips the token
LLAMA3 = CallSyntax.of(FORMATS["llama3_json"])
HERMES_TOOLS = CallSyntax.of(FORMATS["hermes"], names=frozenset({"get_weather", "add"}))   # a request's
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"$ref": "#/$defs/B"}},
       "required": ["a", "b"], "additionalProperties": False, "$defs": {"B": {"type": "boolean"}}}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def test_formats_are_detected_from_the_template_and_can_be_forced():
    assert detect_format(QWEN25_TOOLS_TEMPLATE).name == "hermes"
    assert detect_format("{{ '<|python_tag|>' }}").name == "llama3_json"
    assert detect_format("[TOOL_CALLS] {{ x }}").name == "mistral"
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}").name == "json"
    assert detect_format(None).name == "json"
    forced = tool_setup("hermes", "{{ messages }}")
    assert forced.format.name == "hermes" and not forced.native   # the template cannot show tools
    assert tool_setup("auto", QWEN25_TOOLS_TEMPLATE).native
    with pytest.raises(ValueError, match="tool format must be one of"):
        tool_setup("pythonic", None)
    with pytest.raises(ValueError, match="tool_format must be one of"):
        EngineConfig(tool_format="xml")


@pytest.mark.parametrize("syntax, text, content, calls", [
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me look.\n", [("get_weather", '{"city": "Paris"}')]),
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {"x": "</tool_call>"}}\n</tool_call>\n<tool_call>\n'
             '{"name": "b", "arguments": {}}\n</tool_call>', None, [("a", '{"x": "</tool_call>"}'), ("b", "{}")]),
    (HERMES, '<tool_call>{"name":"a","arguments":{"x":1}}</tool_call> and after', " and after", [("a", '{"x":1}')]),
    (JSON_ENVELOPE, '{"tool_calls": [{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}, {"name": "b", "arguments": {}}]}',
     None, [("a", '{"x": [1, {"y": "}"}]}'), ("b", "{}")]),
    (MISTRAL, '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', None,
     [("a", '{"x": 1}'), ("b", "{}")]),
    (LLAMA3, ' {"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', None,
     [("a", '{"x": 1}'), ("b", "{}")]),
])
def test_parser_splits_content_and_calls_per_format(syntax, text, content, calls):
    parsed = parse_output(text, syntax)
    assert parsed.content == content
    assert [(call.name, call.arguments) for call in parsed.calls] == calls
    _assert_stream_agrees(syntax, text)


@pytest.mark.parametrize("syntax, text", [
    (HERMES, "plain answer, no call"),
    (HERMES, "I would write <tool_call> here"),
    (HERMES, '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>'),         # no name
    (HERMES, '<tool_call>\n{"name": "a", "arguments": [1]}\n</tool_call>'),  # arguments not an object
    (JSON_ENVELOPE, 'Sure: {"tool_calls": [{"name": "a", "arguments": {}}]}'),   # calls must open the answer
    (JSON_ENVELOPE, '{"answer": 42}'),
    (LLAMA3, "{not json"),
])
def test_text_that_is_not_a_well_formed_call_stays_content(syntax, text):
    parsed = parse_output(text, syntax)
    assert parsed.calls == [] and parsed.content == text
    _assert_stream_agrees(syntax, text)


PRETTY_CALL = '{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}'


@pytest.mark.parametrize("text, content, calls", [
    # what Qwen2.5-Coder-1.5B writes in auto instead of <tool_call>
    ("```json\n" + PRETTY_CALL + "\n```", None, [("get_weather", '{\n    "city": "Paris"\n  }')]),
    ('  ```json\n{"name": "add", "arguments": {"a": 1}}\n```\n```json\n{"name": "add", "arguments": {}}\n```'
     "\nDone.", "\nDone.", [("add", '{"a": 1}'), ("add", "{}")]),
    # the model's usual ending: a newline after the last </tool_call>, then end of text
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n', None, [("add", '{"a": 1}')]),
    ("```json\n" + PRETTY_CALL.replace("get_weather", "rm_rf") + "\n```", "same", []),   # not a tool
    ('```json\n{"city": "Paris", "name": "get_weather", "arguments": {}}\n```', "same", []),  # an answer
    ("```python\nprint('hi')\n```", "same", []),
    # what Qwen2.5-Coder-0.5B writes: the call alone
    ('\n{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "Ada", "born": 1815}', "same", []),   # a JSON answer, not a call
    ('{"name": "add", "arguments": {}} {"name": "add", "arguments": {}}', ' {"name": "add", "arguments": {}}',
     [("add", "{}")]),
    ('Here: ```json\n{"name": "add", "arguments": {}}\n```', "same", []),   # fences open the answer only
])
def test_a_fenced_json_call_opening_the_answer_counts_for_the_requests_tools(text, content, calls):
    parsed = parse_output(text, HERMES_TOOLS)
    assert parsed.content == (text if content == "same" else content)
    assert [(call.name, call.arguments) for call in parsed.calls] == calls
    _assert_stream_agrees(HERMES_TOOLS, text)


def test_a_fenced_answer_that_is_no_call_streams_at_once():
    stream = ToolCallStream(HERMES_TOOLS)
    assert stream.feed("```").content == ""                   # may still open a fenced call
    assert stream.feed("py").content == "```py"               # cannot: sent on
    stream = ToolCallStream(HERMES_TOOLS)
    assert stream.feed('```json\n{"ci').content == '```json\n{"ci'   # JSON that does not open with a name
    stream = ToolCallStream(HERMES_TOOLS)
    assert stream.feed('{"ci').content == '{"ci'


def _assert_stream_agrees(syntax: CallSyntax, text: str) -> None:
    """Streamed in random pieces, the deltas add up to what the whole-text parser finds, and
    each call's id, type and name come once, in its first delta, with arguments ""."""
    expected = parse_output(text, syntax)
    for seed in range(8):
        stream, rng, pos, deltas = ToolCallStream(syntax), random.Random(seed), 0, []
        while pos < len(text):
            size = rng.randint(1, 7)
            deltas.append(stream.feed(text[pos:pos + size]))
            pos += size
        deltas.append(stream.finish())
        content = "".join(delta.content for delta in deltas)
        calls: dict[int, list] = {}
        for call in (call for delta in deltas for call in delta.calls):
            if call.index not in calls:
                assert call.id.startswith("call_") and call.name and call.arguments == ""
                calls[call.index] = [call.name, ""]
            else:
                assert call.id is None and call.name is None
                calls[call.index][1] += call.arguments
        assert (content if content.strip() else None) == (expected.content if expected.calls else text or None)
        assert [tuple(calls[i]) for i in sorted(calls)] == [(c.name, c.arguments) for c in expected.calls]
        assert not stream.truncated


def test_a_stream_cut_inside_a_call_is_truncated():
    stream = ToolCallStream(HERMES)
    delta = stream.feed('<tool_call>\n{"name": "f", "arguments": {"a": "b')
    assert delta.calls[0].name == "f" and delta.calls[1].arguments == '{"a": "b'
    assert stream.truncated and not stream.calls
    cut = '<tool_call>\n{"name": "a", "arguments": {"x": 1}'   # whole, a cut call is no call
    assert parse_output(cut, HERMES).calls == []


MB = 1 << 20


def _repeat(piece: str, size: int) -> str:
    return (piece * (size // len(piece) + 1))[:size]


ADVERSARIAL = {
    "openers": (HERMES, lambda n: _repeat("<tool_call>", n)),
    "unclosed string": (HERMES, lambda n: '<tool_call>\n{"name": "' + _repeat('a\\"', n)),
    "deep nesting": (HERMES, lambda n: '<tool_call>\n{"name": "f", "arguments": ' + _repeat('{"a": [', n)),
    "many keys": (HERMES, lambda n: '<tool_call>\n{' + _repeat('"a": 1, ', n)),
    "many calls": (JSON_ENVELOPE, lambda n: '{"tool_calls": [' + _repeat('{"name": "f", "arguments": {}}, ', n)),
    "huge arguments": (HERMES, lambda n: '<tool_call>\n{"name": "f", "arguments": {"a": [' + _repeat("12345, ", n) + "1]}}"),
    "braces": (LLAMA3, lambda n: _repeat("{", n)),
    "partial openers": (HERMES, lambda n: _repeat("<tool_cal", n)),
}


def _best_of(runs: int, work) -> float:
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        work()
        times.append(time.perf_counter() - begin)
    return min(times)


def _stream_all(syntax: CallSyntax, text: str) -> None:
    stream = ToolCallStream(syntax)
    for pos in range(0, len(text), 16):
        stream.feed(text[pos:pos + 16])
    stream.finish()


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_output_parses_in_linear_time(name):
    syntax, make = ADVERSARIAL[name]
    text = make(MB)
    parse_time = _best_of(3, lambda: parse_output(text, syntax))
    stream_small = _best_of(3, lambda: _stream_all(syntax, make(MB // 4)))
    stream_time = _best_of(3, lambda: _stream_all(syntax, text))
    print(f"\n{name}: parse 1 MB in {parse_time * 1000:.1f} ms; streamed in 16-character deltas "
          f"{stream_time * 1000:.0f} ms (256 KB: {stream_small * 1000:.0f} ms)")
    # a hang guard, not a speed test (the times are printed, -s): a quadratic pass over
    # 1 MB takes minutes, a linear one milliseconds
    assert parse_time < 10 and stream_time < 10
    assert len(parse_output(text, syntax).calls) <= MAX_CALLS


# ----------------------------------------------------------------------------- grammars

@pytest.fixture(scope="module")
def vocabulary():
    """A byte tokenizer with `<tool_call>`, `</tool_call>` (plain added tokens, as in Qwen2.5)
    and `[TOOL_CALLS]` (a special one, as in Mistral), read by llguidance."""
    tokenizer = byte_tokenizer()
    backend = tokenizer.backend_tokenizer
    backend.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    backend.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True)])
    eos = backend.token_to_id("<|im_end|>")
    return backend, llguidance.LLTokenizer(backend.to_str(), n_vocab=320, eos_token=eos), eos


def _walk(vocabulary, grammar: str, seed: int, push: int | None = None) -> str:
    """Random tokens among those the grammar allows (`push` picked often when allowed) until it
    ends: what a random model under the grammar writes."""
    backend, lltokenizer, eos = vocabulary
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    rng, ids = random.Random(seed), []
    for _ in range(3000):
        if matcher.is_stopped():
            break
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[:320]).tolist()
        token = push if push in allowed and rng.random() < 0.3 else rng.choice(allowed)
        if token == eos:
            break
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    return backend.decode(ids, skip_special_tokens=True)


def _setup_ids(vocabulary, format_name: str) -> dict[str, int]:
    backend = vocabulary[0]
    return {t: backend.token_to_id(t) for t in FORMATS[format_name].tokens if backend.token_to_id(t) is not None}


@pytest.mark.parametrize("format_name", sorted(FORMATS))
@pytest.mark.parametrize("mode, parallel", [("required", False), ("required", True), ("auto", False)])
def test_every_output_the_grammar_allows_parses_into_valid_calls(vocabulary, format_name, mode, parallel):
    tool_format = FORMATS[format_name]
    token_ids = _setup_ids(vocabulary, format_name)
    syntax = CallSyntax.of(tool_format, frozenset({"[TOOL_CALLS]"}) & frozenset(token_ids))
    grammar = tool_grammar(tool_format, [(name, schema, True) for name, schema in SCHEMAS.items()],
                           mode, parallel, token_ids)
    push = token_ids.get(tool_format.trigger, vocabulary[0].token_to_id("{"))
    counts = []
    for seed in range(12):
        text = _walk(vocabulary, grammar, seed, push if mode == "auto" else None)
        parsed = parse_output(text, syntax)
        counts.append(len(parsed.calls))
        if mode == "required":
            assert parsed.calls and parsed.content is None, text
        if not parallel:
            assert len(parsed.calls) <= 1, text
        for call in parsed.calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert sum(counts) >= 3, counts   # auto: the pushed trigger opened calls


def test_a_named_choice_allows_that_tool_only(vocabulary):
    grammar = tool_grammar(FORMATS["hermes"], [("add", ADD, True)], "required", False, _setup_ids(vocabulary, "hermes"))
    for seed in range(10):
        parsed = parse_output(_walk(vocabulary, grammar, seed), HERMES)
        assert [call.name for call in parsed.calls] == ["add"]


def test_hermes_calls_may_end_with_the_newline_models_write_before_stopping(vocabulary):
    """Qwen2.5 writes `</tool_call>` then a newline, then stops: the grammar must let it stop
    there (a newline that could only open another call made it call again until max_tokens)."""
    backend, lltokenizer, eos = vocabulary
    grammar = tool_grammar(FORMATS["hermes"], [("add", ADD, True)], "required", True, _setup_ids(vocabulary, "hermes"))
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": true}}\n</tool_call>\n'
    assert matcher.consume_tokens(backend.encode(text, add_special_tokens=False).ids), matcher.get_error()
    assert matcher.is_accepting() and matcher.consume_token(eos)


def test_call_schemas_keep_references_working():
    schema = call_schema("f", {"type": "object", "properties": {"self": {"$ref": "#"}, "b": {"$ref": "#/$defs/B"}},
                               "$defs": {"B": {"type": "integer"}}}, "arguments", strict=True)
    assert schema["$defs"] == {"B": {"type": "integer"}}
    assert schema["properties"]["arguments"]["properties"]["self"] == {"$ref": "#/properties/arguments"}
    assert "lenient" not in schema["x-guidance"]
    assert call_schema("f", {"type": "object"}, "arguments", strict=False)["x-guidance"]["lenient"]


# ----------------------------------------------------------------------------- requests and prompts

def test_tools_and_tool_choice_are_checked_with_the_field_named():
    tools = parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}])
    cases = [
        (lambda: parse_tools([{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
        (lambda: parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
         "tools[0].function.parameters"),
        (lambda: parse_tools([{"type": "function", "function": {"name": "f"}}] * 2), "tools[1].function.name"),
        (lambda: parse_tool_choice("always", tools), "tool_choice"),
        (lambda: parse_tool_choice({"type": "function", "function": {"name": "nope"}}, tools), "tool_choice"),
        (lambda: parse_tool_choice("required", []), "tool_choice"),
    ]
    for make, param in cases:
        with pytest.raises(ToolRequestError) as error:
            make()
        assert error.value.param == param, error.value
    assert parse_tool_choice(None, tools).mode == "auto" and parse_tool_choice(None, []).mode == "none"
    assert parse_tools([{"type": "function", "function": {"name": "f"}}])[0].parameters["type"] == "object"


def test_none_parses_nothing_and_bans_the_trigger_token():
    setup = tool_setup("auto", QWEN25_TOOLS_TEMPLATE)
    setup = type(setup)(setup.format, True, {"<tool_call>": 260, "</tool_call>": 261}, frozenset())
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    plan = tool_plan(setup, tools, "none")
    assert plan.grammar is None and plan.syntax is None and plan.template_tools is None
    assert plan.calls_in('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', "stop") is None
    from hayate.sampling import SamplingParams
    assert plan.apply(SamplingParams(logit_bias={260: 100})).logit_bias[260] == -100
    required = tool_plan(setup, tools, "required")
    assert required.grammar.kind == "lark" and required.template_tools[0]["function"]["name"] == "get_weather"
    assert tool_plan(setup, None, None) is None


def test_history_calls_reach_templates_as_objects_and_the_polyfill_writes_them_as_text():
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    native = template_messages(history, tool_setup("auto", QWEN25_TOOLS_TEMPLATE), None)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[2]["name"] == "get_weather" and native[1]["content"] == ""
    tools = parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}])
    polyfilled = template_messages(history, tool_setup("auto", None), tools)
    assert polyfilled[0]["role"] == "system" and '"name": "get_weather"' in polyfilled[0]["content"]
    assert polyfilled[2] == {"role": "assistant",
                             "content": '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'}
    assert polyfilled[3]["role"] == "user" and json.loads(polyfilled[3]["content"]) == {
        "tool_response": {"name": "get_weather", "content": "18 C"}}
