"""Chat templates: render a conversation into the prompt text a model was trained on.

Templates are Jinja code shipped with model files, so they are untrusted: they run in Jinja's
immutable sandbox, with the environment transformers' `apply_chat_template` sets up (so the
same template renders the same text here and there).
"""
from __future__ import annotations

import json
from datetime import datetime
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning arrives under; transformers copies it to the first and to "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or rendered for this conversation."""


class _TemplateRaised(jinja2.TemplateError):
    """Raised by a template's own `raise_exception(message)`."""


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


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    rendering keeps the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so templates cannot reach Python internals."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: `self` may also be an attribute name
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                               dict=_TemplateDict(), namespace=_TemplateNamespace)
    return environment


def _plain(value: Any) -> Any:
    """A copy built from plain JSON types, so templates see no methods of caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    # Subclasses (str enums, numpy floats) may carry extra methods: keep only the base value.
    for base, unwrap in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return unwrap(value)
    return f"<{type(value).__name__}>"  # anything else becomes an inert placeholder


def _prepare_message(message: dict) -> dict:
    """Drop None fields (templates test for missing keys) and alias reasoning like transformers."""
    message = {key: value for key, value in _plain(message).items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class ChatTemplate:
    """A compiled chat template. `render` raises ChatTemplateError for any template failure."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self._special_tokens = {name: token for name, token in (("bos_token", bos_token), ("eos_token", eos_token))
                                if token is not None}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(f"chat template syntax error on line {error.lineno}: {error.message}") from error

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChatTemplate":
        """The tokenizer's own template, or `default_chat_template()` when it has none."""
        source = tokenizer.chat_template or default_chat_template()
        return cls(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra) -> str:
        if not all(isinstance(message, dict) for message in messages):
            raise ChatTemplateError("chat messages must be dicts with 'role' and 'content'")
        context = {**self._special_tokens, "documents": None, **_plain(extra)}
        try:
            return self._template.render(messages=[_prepare_message(m) for m in messages], tools=_plain(tools),
                                         add_generation_prompt=add_generation_prompt, **context)
        except _TemplateRaised as error:
            raise ChatTemplateError(f"chat template rejected the conversation: {error.message}") from error
        except jinja2.exceptions.SecurityError as error:
            raise ChatTemplateError(f"chat template attempted an unsafe operation: {error}") from error
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as error:
            raise ChatTemplateError(f"chat template failed: {type(error).__name__}: {error}") from error
