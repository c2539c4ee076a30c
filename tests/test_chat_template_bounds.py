"""Chat template bounds: hostile templates fail fast with one line, real ones render as before."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from hayate.loading.builtin_templates import default_chat_template
from hayate.loading.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateLimitError

ONE_TURN = [{"role": "user", "content": "Hi!"}]
TIME, SIZE, DEPTH = "ran longer than 0.5 s", "output exceeds 4,194,304 characters", "nests deeper than 64"
ITEMS, ALLOCATED, BITS = "list of more than 262,144 items", "allocates more than", "number larger than 65,536 bits"
BIG = "{% set s = 'x' * 4000000 %}"   # the largest string a template may build


def doubling(step: str, start: str = "'x'", times: int = 40) -> str:
    return (f"{{% set ns = namespace(s={start}) %}}{{% for i in range({times}) %}}{{% set ns.s = {step} %}}"
            "{% endfor %}{{ ns.s }}")


def nested(opening: str, closing: str, depth: int = 3000, body: str = "x") -> str:
    return opening * depth + body + closing * depth


# name: (what the one-line error says, template source)
HOSTILE = {
    # Time: loops whose body makes no call at all, and bounded operations repeated.
    "nested_range_loops": (TIME, "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"),
    "three_small_loops": (TIME, "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}"
                                "{% endfor %}{% endfor %}{% endfor %}"),
    "loops_over_a_literal": (TIME, "{% set l = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] %}"
                             + nested("{% for a in l %}", "{% endfor %}", 12, "")),
    "loop_cycle": (TIME, "{% for i in range(99999) %}{% for j in range(99999) %}{{ loop.cycle('a') if false }}"
                         "{% endfor %}{% endfor %}"),
    "compare_in_loop": (TIME, BIG + "{% set t = 'x' * 3999999 ~ 'y' %}{% for i in range(99999) %}"
                              "{% if s == t %}{% endif %}{% endfor %}"),
    "substring_in_loop": (TIME, BIG + "{% for i in range(99999) %}{% if 'y' in s %}{% endif %}{% endfor %}"),
    "straight_line_compares": (TIME, "{% set a = [[[0]] * 130000] * 16 %}{% set b = [[[0]] * 130000] * 16 %}"
                                     + "{% if a == b %}{% endif %}" * 100),   # each about 50 ms
    "slice_in_loop": (ALLOCATED, BIG + "{% for i in range(99999) %}{% set t = s[1:] %}{% endfor %}"),
    # Size: strings, lists and numbers grown by operators, methods and filters.
    "str_times_power": (SIZE, "{{ 'x' * 10**10 }}"),
    "str_times_literal": (SIZE, "{{ 'x' * 10000000000 }}"),
    "list_times_power": (ITEMS, "{{ [0] * 10**10 }}"),
    "zfill": (SIZE, "{{ 'x'.zfill(10**10) }}"),
    "center": (SIZE, "{{ 'x'.center(10**10) }}"),
    "ljust_literal": (SIZE, "{{ 'x'.ljust(10000000000) }}"),
    "rjust": (SIZE, "{{ 'x'.rjust(10**10, 'y') }}"),
    "format_width": (SIZE, "{{ '{:>10000000000}'.format(1) }}"),
    "format_nested_width": (SIZE, "{{ '{:>{}}'.format(1, 10**10) }}"),
    "format_map_width": (SIZE, "{{ '{a:>10000000000}'.format_map({'a': 1}) }}"),
    "format_repeated_field": (SIZE, BIG + "{{ ('{0}' * 1000).format(s) }}"),
    "percent_star_width": (SIZE, "{{ '%0*d' % (10**9, 1) }}"),
    "percent_width": (SIZE, "{{ '%01000000000d' % 1 }}"),
    "percent_precision": (SIZE, "{{ '%.1000000000f' % 1.0 }}"),
    "percent_repeated_key": (SIZE, BIG + "{{ ('%(a)s' * 100) % {'a': s} }}"),
    "format_filter": (SIZE, "{{ '%01000000000d' | format(1) }}"),
    "center_filter": (SIZE, "{{ 'x' | center(10**10) }}"),
    "center_filter_constant": (SIZE, "{{ 'x' | center(10000000000) }}"),
    "map_center": (SIZE, "{{ range(3) | map('center', 10**10) | list }}"),
    "indent_width": (SIZE, "{{ ('a\n' * 1000) | indent(10**9) }}"),
    "indent_string": (SIZE, "{{ ('a\n' * 100000) | indent('x' * 10000) }}"),
    "join_filter": (SIZE, BIG + "{{ [s, s, s] | join }}"),
    "join_method_separator": (SIZE, "{{ ('x' * 4000000).join(['a', 'b', 'c']) }}"),
    "join_method_items": (SIZE, "{% set s = 'x' * 1000000 %}{{ ''.join([s] * 100) }}"),
    "namespace_doubling_tilde": (SIZE, doubling("ns.s ~ ns.s")),
    "namespace_doubling_plus": (SIZE, doubling("ns.s + ns.s")),
    "list_doubling": (ITEMS, doubling("ns.s + ns.s", start="[0]")),
    "shared_list_doubling": (SIZE, doubling("[ns.s, ns.s]", start="[0]", times=60)),
    "shared_tuple_hashing": (SIZE, doubling("(ns.s, ns.s)", start="(1,)") + "{{ [ns.s] | unique | list }}"),
    "shared_list_compare": (SIZE, doubling("[ns.s, ns.s]", start="[0]", times=30) + "{{ ns.s == ns.s[:] }}"),
    "string_of_shared_list": (SIZE, doubling("[ns.s, ns.s]", start="[0]", times=60) + "{{ ns.s | string }}"),
    "replace_chain": (SIZE, doubling("ns.s.replace('x', 'xx')", times=60)),
    "replace_filter": (SIZE, "{{ ('x' * 100000) | replace('x', 'x' * 100000) }}"),
    "replace_empty_old": (SIZE, "{{ ('x' * 100000).replace('', 'y' * 1000) }}"),
    "wordwrap_wrapstring": (SIZE, "{{ ('ab ' * 10000) | wordwrap(1, wrapstring='x' * 100000) }}"),
    "wordwrap_long_input": ("slow filter", "{{ ('ab ' * 1000000) | wordwrap(1) }}"),
    "batch": (ITEMS, "{{ [1] | batch(10**9, 0) | list }}"),
    "batch_fill_shared": (SIZE, BIG + "{% for b in [1] | batch(100000, s) %}{{ b == b[:] }}{% endfor %}"),
    "slice_filter": (ITEMS, "{{ [1] | slice(10**9) | list }}"),
    "range_list": (ITEMS, "{{ range(10**9) | list }}"),
    "range_huge": (ITEMS, "{{ range(10**30) | list }}"),
    "sum_range": (ITEMS, "{{ range(10**9) | sum }}"),
    "sum_lists": (ALLOCATED, "{{ ([[0] * 1000] * 1000) | sum(start=[]) }}"),
    "sort_string": (ITEMS, "{{ ('x' * 4000000) | sort }}"),
    "list_of_string": (ITEMS, "{{ ('日' * 4000000) | list | length }}"),
    "tojson_indent": (SIZE, "{{ [1, [2]] | tojson(indent=10**9) }}"),
    "dict_fromkeys": (ITEMS, "{{ dict.fromkeys(range(10**9)) }}"),
    "split": (ITEMS, "{{ (' ' * 4000000).split(' ') | length }}"),
    "splitlines": (ITEMS, "{{ ('a\n' * 2000000).splitlines() | length }}"),
    "output_loop": (SIZE, "{% for i in range(100000) %}{{ 'a' * 100000 }}{% endfor %}"),
    "macro_output_loop": (ALLOCATED, "{% macro m() %}{% for i in range(100000) %}{{ 'a' * 100000 }}{% endfor %}"
                                     "{% endmacro %}{{ m() }}"),
    "set_block_loop": (ALLOCATED, "{% set x %}{% for i in range(100000) %}{{ 'a' * 100000 }}{% endfor %}"
                                  "{% endset %}{{ x | length }}"),
    "many_big_variables": (ALLOCATED, BIG + "".join(f"{{% set a{i} = s + 'y' %}}" for i in range(100))),
    "many_partitions": (ALLOCATED, BIG + "".join(f"{{% set p{i} = s.partition('x') %}}" for i in range(100))),
    "many_set_blocks": (ALLOCATED, BIG + "".join(f"{{% set b{i} %}}{{{{ s }}}}{{% endset %}}" for i in range(100))),
    "kept_dicts": (ALLOCATED, doubling("ns.s + [dict.fromkeys(range(262144))]", start="[]", times=1000)),
    "kept_namespaces": (ALLOCATED, "{% set d = dict.fromkeys(range(262144)) %}"
                                   + doubling("ns.s + [namespace(d)]", start="[]", times=1000)),
    "macro_fan_out": (SIZE, "{% macro f(n) %}{{ 'x' * 1000000 }}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                            "{% endmacro %}{{ f(30) }}"),
    "namespace_repr": (SIZE, BIG + "{{ namespace(a=s, b=s, c=s, d=s, e=s) }}"),
    "power": (BITS, "{{ 10 ** (10 ** 10) }}"),
    "integer_squaring": (BITS, doubling("ns.s * ns.s", start="3")),
    # Depth: recursion at run time, nesting at compile time.
    "recursive_macro": (DEPTH, "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
    "mutual_macros": (DEPTH, "{% macro f() %}{{ g() }}{% endmacro %}{% macro g() %}{{ f() }}{% endmacro %}{{ f() }}"),
    "recursive_loop": (DEPTH, "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}"),
    "caller_recursion": (DEPTH, "{% macro f() %}{% call f() %}{{ caller() }}{% endcall %}{% endmacro %}"
                                "{% call f() %}x{% endcall %}"),
    "block_recursion": (DEPTH, "{% block b %}{{ self.b() }}{% endblock %}"),
    "nested_tuple": (DEPTH, doubling("(ns.s,)", start="()", times=100000)),
    "lazy_filter_chain": (DEPTH, doubling("ns.s | map('abs')", start="[1]", times=5000) + "{{ ns.s | list }}"),
    "deep_if": (DEPTH, nested("{% if true %}", "{% endif %}")),
    "deep_parentheses": (DEPTH, "{{ " + nested("(", ")", body="1") + " }}"),
    "deep_not": (DEPTH, "{{ " + "not " * 3000 + "1 }}"),
    "long_sum": (DEPTH, "{{ " + " + ".join(["1"] * 3000) + " }}"),
    "long_filter_chain": (DEPTH, "{{ 'x'" + " | trim" * 3000 + " }}"),
    "long_attribute_chain": (DEPTH, "{{ x" + ".a" * 3000 + " }}"),
    "deep_for": ("too deeply to compile", nested("{% for a in [1] %}", "{% endfor %}", 25)),
    # Refused outright.
    "large_source": ("source exceeds 262,144 characters", "x" * 300000),
    "encode": ("unsafe", "{{ 'x'.encode() }}"),
    "to_bytes": ("unsafe", "{{ (1).to_bytes(10**10, 'big') }}"),
    "translate": ("unsafe", "{{ ('x' * 1000).translate({120: 'y' * 100000}) }}"),
    "expandtabs": ("unsafe", "{{ ('\t' * 1000).expandtabs(10**7) }}"),
    "lipsum": ("undefined", "{{ lipsum(n=10**9) }}"),
    "strftime_now": ("longer than 256 characters", "{{ strftime_now('%c' * 10**6) }}"),
}


def memory_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def reset_peak_memory() -> bool:
    """Reset the kernel's count of this process's peak memory (Linux), so a bomb's peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_fails_fast_in_one_line(name):
    message, source = HOSTILE[name]
    measures_memory = reset_peak_memory()
    before_kib, start = memory_kib("VmRSS") if measures_memory else 0, time.perf_counter()
    with pytest.raises(ChatTemplateError) as raised:
        ChatTemplate(source).render(ONE_TURN)
    seconds = time.perf_counter() - start
    assert message in str(raised.value)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400
    assert seconds < 2, f"{name} took {seconds:.1f} s to fail"
    if measures_memory:
        grown_mib = (memory_kib("VmHWM") - before_kib) / 1024
        assert grown_mib < 100, f"{name} took {grown_mib:.0f} MiB"


def test_bombs_leave_the_process_healthy():
    template = ChatTemplate(default_chat_template())
    expected, threads = template.render(ONE_TURN), threading.active_count()
    for name in ("nested_range_loops", "str_times_power", "recursive_macro", "replace_chain", "macro_output_loop"):
        with pytest.raises(ChatTemplateLimitError):
            ChatTemplate(HOSTILE[name][1]).render(ONE_TURN)
    assert template.render(ONE_TURN) == expected
    assert threading.active_count() == threads   # no render keeps running after its error


def test_renders_on_other_threads_keep_their_own_budget():
    bomb, normal = ChatTemplate(HOSTILE["nested_range_loops"][1]), ChatTemplate(default_chat_template())
    errors, outputs = [], set()
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(ChatTemplateLimitError, bomb.render, [])))
    thread.start()
    while thread.is_alive():   # renders here start after the bomb's clock, and must not share it
        outputs.add(normal.render(ONE_TURN))
    thread.join()
    assert len(outputs) == 1 and len(errors) == 1


def test_limits_are_constructor_arguments():
    with pytest.raises(ChatTemplateLimitError, match="output exceeds 100 characters"):
        ChatTemplate("{{ 'x' * 101 }}", max_output_chars=100).render(ONE_TURN)
    with pytest.raises(ChatTemplateLimitError, match="ran longer than 0.05 s"):
        ChatTemplate(HOSTILE["nested_range_loops"][1], max_seconds=0.05).render(ONE_TURN)
    countdown = ChatTemplate("{% macro f(n) %}{{ n }}{% if n %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(start) }}",
                             max_depth=10)
    assert countdown.render(ONE_TURN, start=9) == "9876543210"   # ten calls deep
    with pytest.raises(ChatTemplateLimitError, match="nests deeper than 10"):
        countdown.render(ONE_TURN, start=10)


def test_check_fails_a_template_that_breaks_its_bounds_on_any_input():
    for source in (HOSTILE["nested_range_loops"][1], "{% if tools %}{{ 'x' * 10**10 }}{% endif %}",
                   "{% macro f() %}{{ f() }}{% endmacro %}"
                   "{% for m in messages if m.tool_calls is defined %}{{ f() }}{% endfor %}"):
        with pytest.raises(ChatTemplateLimitError):
            ChatTemplate(source).check()
    # A template refusing a sample (no system role here) is the template's business, not a bomb.
    ChatTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}").check()
    ChatTemplate(default_chat_template()).check()


def test_errors_stay_on_one_line():
    with pytest.raises(ChatTemplateError, match="rejected the conversation: line one line two") as raised:
        ChatTemplate("{{ raise_exception('line one\nline two\n' * 100000) }}").render(ONE_TURN)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400


# Qwen2.5-Instruct's template, with its tools section.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags:"
        "\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TURNS = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "18"}, {"role": "tool", "content": "sunny"}]


def transformers_render(source, messages, **kwargs) -> str:
    backend = Backend(models.BPE(vocab={"a": 0, "<s>": 1}, merges=[]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<s>")
    return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_real_template_with_tools_renders_as_in_transformers(tools):
    template = ChatTemplate(QWEN25_TEMPLATE)
    template.check()
    for messages in ([{"role": "system", "content": "Be brief."}, *ONE_TURN], TOOL_TURNS):
        expected = transformers_render(QWEN25_TEMPLATE, messages, tools=tools, add_generation_prompt=True)
        assert template.render(messages, tools=tools) == expected


def test_long_conversations_stay_within_bounds():
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 2000}
                for i in range(200)]   # 2 MB of text, about half a million tokens
    rendered = ChatTemplate(QWEN25_TEMPLATE).render(messages, tools=TOOLS)
    assert rendered == transformers_render(QWEN25_TEMPLATE, messages, tools=TOOLS, add_generation_prompt=True)
