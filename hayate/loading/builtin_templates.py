"""Chat templates hayate brings itself, for model files that ship none."""
from __future__ import annotations


def default_chat_template() -> str:
    """A plain ChatML template, the fallback for a tokenizer that ships none.

    It is a guess, not the model's format: a base model without a template was not trained
    on any chat format, so prefer raw completions with such models."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def gemma_chat_template() -> str:
    """Gemma's own chat format, for a Gemma 3 file that ships no template (a base model's GGUF):
    a system message opens the first user turn; the assistant's role is "model"."""
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
        "{% if loop.first %}{{ prefix }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] | trim }}"
        "{% endif %}{% endfor %}{% endif %}"
        "{{ '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
