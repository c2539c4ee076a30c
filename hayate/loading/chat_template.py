"""Chat templates: render a conversation into the prompt text a model was trained on.

Templates are Jinja code shipped with model files, so they are untrusted: they run in Jinja's
immutable sandbox, with the environment transformers' `apply_chat_template` sets up (so the
same template renders the same text here and there), and within bounds of output size, time
and nesting depth (template_limits, with per-operation size guards in template_guards), so a
template bomb fails one request with one line.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from types import BuiltinMethodType, MethodType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from hayate.loading import template_guards as guards
from hayate.loading.builtin_templates import default_chat_template
from hayate.loading import template_limits as bounds
from hayate.loading.template_limits import Budget, TemplateLimitError, TemplateLimits

# Names a message's reasoning arrives under; transformers copies it to the first and to "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or rendered for this conversation."""


class ChatTemplateLimitError(ChatTemplateError):
    """The chat template went past a bound on output size, time or nesting depth."""


class _TemplateRaised(jinja2.TemplateError):
    """Raised by a template's own `raise_exception(message)`."""


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
    if len(str(format_string)) > 256:   # each directive may print a few dozen characters
        raise ValueError("strftime_now format is longer than 256 characters")
    return datetime.now().strftime(format_string)


_METHOD_TYPES = (BuiltinMethodType, MethodType)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox transformers uses, with every operation that builds, loops or recurses bounded:
    operators and calls through the sandbox's hooks, filters and tests wrapped, and loops, `~`,
    comparisons, slices and literals rewritten at parse time to pass through internal filters."""

    intercepted_binops = frozenset(guards.BINOP_GUARDS)

    def __init__(self, limits: TemplateLimits):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols],
                         finalize=bounds.finalize)
        self.limits, self.concat = limits, bounds.join_buffer   # `concat` joins macro and block output
        self.filters["tojson"] = _tojson
        self.filters = {name: guards.bound_filter(name, func) for name, func in self.filters.items()
                        if name != "urlize"}   # links for HTML, a pure-Python pass over each word
        self.filters.update(bounds.INTERNAL_FILTERS)
        self.tests.update({name: bounds.bound_test(self.tests[name]) for name in bounds.SLOW_TESTS})
        del self.globals["lipsum"]
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_TemplateNamespace, range=bounds.bounded_range)

    def is_safe_attribute(self, obj, attr, value) -> bool:
        blocked = attr in bounds.BLOCKED_METHODS and isinstance(obj, (str, int))
        return not blocked and super().is_safe_attribute(obj, attr, value)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's names leave `self` to kwargs)
        budget = bounds.current_budget()
        budget.check_time()
        if type(__obj) in _METHOD_TYPES and __obj.__name__ in guards.METHOD_GUARDS:
            args = guards.METHOD_GUARDS[__obj.__name__](budget, __obj.__self__, args, kwargs) or args
        if budget.depth >= budget.limits.max_depth:   # macros and recursive loops recurse through here
            raise budget.too_deep()
        budget.depth += 1
        try:
            return budget.account(super().call(__context, __obj, *args, **kwargs))
        finally:
            budget.depth -= 1

    def call_binop(self, context, operator, left, right):
        budget = bounds.current_budget()
        if operator == "+" and type(left) is str and type(right) is str:   # most of a chat template's work
            if len(left) + len(right) > budget.max_chars:
                budget.check_chars(len(left) + len(right))
            text = left + right   # its cost is its size, which the allocation total bounds
            budget.allocated += len(text) if text.isascii() else 4 * len(text)
            if budget.allocated > budget.max_allocated:
                budget.allocate(0)
            return text
        budget.check_time()
        measured = guards.BINOP_GUARDS[operator](budget, left, right)
        result = self.binop_table[operator](left, right)
        if measured is None:
            return budget.account(result)
        budget.allocate(16 * len(result))
        return budget.remember(result, *measured)

    def wrap_str_format(self, value):
        """str.format and format_map, formatting through a formatter that bounds each field."""
        if not isinstance(value, (MethodType, BuiltinMethodType)) or value.__name__ not in ("format", "format_map"):
            return None
        text, is_format_map = value.__self__, value.__name__ == "format_map"
        if not isinstance(text, str):
            return None

        def wrapper(*args, **kwargs):
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            formatter = (guards.BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup)
                         else guards.BoundedFormatter(self))
            formatter.total = len(text)
            return type(text)(formatter.vformat(text, args, kwargs))

        return wrapper

    def _parse(self, source, name, filename):
        if len(source) > self.limits.max_source_chars:   # compiling takes about 1 ms per 50 characters
            raise TemplateLimitError(f"chat template source exceeds {self.limits.max_source_chars:,} characters")
        try:
            tree = super()._parse(source, name, filename)
        except RecursionError:   # nesting deep enough to exhaust the parser's stack
            raise self.limits.too_deep() from None
        _check_nesting(tree, self.limits)
        tree = _BoundsRewriter(nodes.EvalContext(self)).visit(tree)
        tree.set_environment(self)
        return tree


def _check_nesting(tree: nodes.Template, limits: TemplateLimits) -> None:
    """Deeper trees would exhaust the stack of Jinja's compiler or Python's."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            raise limits.too_deep()
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())


def _bounded_by_constant(node: nodes.Compare) -> bool:
    """Whether each comparison has a constant side that bounds its cost (`role == 'user'`)."""
    operands = [node.expr, *(operand.expr for operand in node.ops)]
    for left, operand, right in zip(operands, node.ops, operands[1:]):
        sides = (right,) if operand.op in ("in", "notin") else (left, right)
        if not any(isinstance(side, nodes.Const) for side in sides):
            return False
    return True


class _BoundsRewriter(NodeTransformer):
    """Routes each loop's iterable, `~`, comparison, literal and slice through an internal filter."""

    def __init__(self, eval_ctx: nodes.EvalContext):
        self.eval_ctx = eval_ctx

    def _through(self, node: nodes.Expr, name: str, constant_too: bool = False) -> nodes.Expr:
        if not constant_too:
            try:
                node.as_const(self.eval_ctx)   # constants are folded at compile time: nothing to bound
                return node
            except Exception:   # nodes.Impossible, or an error left for run time
                pass
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._through(node.iter, bounds.LOOP, constant_too=True)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Expr:
        node = self._through(self.generic_visit(node), bounds.CONCAT)
        if isinstance(node, nodes.Filter):   # the filter joins the parts itself
            node.node = nodes.List(node.node.nodes, lineno=node.lineno)
        return node

    def visit_Compare(self, node: nodes.Compare) -> nodes.Expr:
        node = self.generic_visit(node)
        return node if _bounded_by_constant(node) else self._through(node, bounds.TICK)

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Expr:
        node = self.generic_visit(node)
        return self._through(node, bounds.SLICED) if isinstance(node.arg, nodes.Slice) else node

    def visit_List(self, node: nodes.Expr) -> nodes.Expr:
        node = self.generic_visit(node)
        return self._through(node, bounds.BUILT) if getattr(node, "ctx", "load") == "load" else node

    visit_Tuple = visit_Dict = visit_List


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


_SAMPLE_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name."}},
                   "required": ["city"]}}}]
_SAMPLE_TURNS = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi!"},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather in Paris?"}]
_SAMPLE_CALL = [{"role": "assistant", "content": "", "tool_calls": [{
    "id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "18 C, sunny"}]
_SAMPLES = ((_SAMPLE_TURNS, True, None), (_SAMPLE_TURNS, False, None), (_SAMPLE_TURNS[1:], True, None),
            (_SAMPLE_TURNS, True, _SAMPLE_TOOLS), (_SAMPLE_TURNS[1:] + _SAMPLE_CALL, True, _SAMPLE_TOOLS))


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text)[:2 * limit].split())
    return text if len(text) <= limit else text[:limit] + "..."


class ChatTemplate:
    """A compiled chat template. `render` raises ChatTemplateError for any template failure, and
    ChatTemplateLimitError when the template goes past its bounds: more than `max_output_chars` of
    output (or in any one string or list it builds), more than `max_seconds` of rendering, or macro
    calls and template nesting deeper than `max_depth`."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None, *,
                 max_output_chars: int = 4 * 1024 * 1024, max_seconds: float = 0.5, max_depth: int = 64):
        self.source = source
        self.limits = TemplateLimits(max_output_chars, max_seconds, max_depth)
        self._special_tokens = {name: token for name, token in (("bos_token", bos_token), ("eos_token", eos_token))
                                if token is not None}
        environment = _BoundedEnvironment(self.limits)
        try:   # constant folding at compile time runs the same checks, without a deadline
            self._template = bounds.with_budget(Budget(self.limits, math.inf), environment.from_string, source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(
                f"chat template syntax error on line {error.lineno}: {_one_line(error.message)}") from error
        except TemplateLimitError as error:
            raise ChatTemplateLimitError(str(error)) from None
        except (SyntaxError, RecursionError) as error:   # Python's own nesting limits, compiling the template
            raise ChatTemplateLimitError(f"chat template nests too deeply to compile: {_one_line(error)}") from None

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChatTemplate":
        """The tokenizer's own template, or `default_chat_template()` when it has none."""
        source = tokenizer.chat_template or default_chat_template()
        return cls(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra) -> str:
        if not all(isinstance(message, dict) for message in messages):
            raise ChatTemplateError("chat messages must be dicts with 'role' and 'content'")
        budget = Budget(self.limits, self.limits.max_seconds)
        try:
            variables = {**self._special_tokens, "documents": None, **_plain(extra), "tools": _plain(tools),
                         "messages": [_prepare_message(m) for m in messages],
                         "add_generation_prompt": add_generation_prompt}
            return bounds.with_budget(budget, self._render, variables, budget)
        except TemplateLimitError as error:
            raise ChatTemplateLimitError(str(error)) from None
        except RecursionError:   # backstops: the bounds above should stop a template before these
            raise ChatTemplateLimitError(str(budget.too_deep())) from None
        except MemoryError:
            raise ChatTemplateLimitError("chat template ran out of memory") from None
        except _TemplateRaised as error:
            raise ChatTemplateError(f"chat template rejected the conversation: {_one_line(error.message)}") from error
        except jinja2.exceptions.SecurityError as error:
            raise ChatTemplateError(f"chat template attempted an unsafe operation: {_one_line(error)}") from error
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as error:
            raise ChatTemplateError(f"chat template failed: {type(error).__name__}: {_one_line(error)}") from error

    def _render(self, variables: dict, budget: Budget) -> str:
        """Template.render, with the output counted as it streams."""
        stream = self._template.root_render_func(self._template.new_context(variables))
        try:
            return bounds.bounded_join(stream, budget)
        finally:
            stream.close()

    def check(self) -> None:
        """Render a few sample conversations (with and without a system message, generation prompt
        and tools), so a template that breaks its bounds on any input fails at load time with one
        line. The template refusing a sample (raise_exception, a missing field) is fine."""
        for messages, add_generation_prompt, tools in _SAMPLES:
            try:
                self.render(messages, add_generation_prompt, tools)
            except ChatTemplateLimitError:
                raise
            except ChatTemplateError:
                pass
