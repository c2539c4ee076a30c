"""Size predictions for chat-template operations, made before each result is built.

Guards for `+`, `*`, `**` and `%` (BINOP_GUARDS), for str methods whose result can outgrow
their inputs (METHOD_GUARDS), str.format formatters that count each field, and guards run
before Jinja's filters (FILTER_GUARDS, applied by bound_filter). Each raises
TemplateLimitError through the render's Budget (template_limits) when a result would pass a
bound.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from itertools import islice

from jinja2.filters import do_sum, make_attrgetter
from jinja2.sandbox import SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import _PassArg, pass_context

from hayate.loading.template_limits import Budget, LazyResult, TemplateLimitError, check_bits, current_budget

_SEPARATORS = list(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") + [
    chr(code) for code in range(0x2000, 0x200B)]   # everything str.split() or splitlines() splits at
_PERCENT_FIELD = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_DIGITS = re.compile(r"\d+")


def _number(value) -> int:
    return value if isinstance(value, int) else 0


def _bounded_list(budget: Budget, values) -> list | tuple:
    if isinstance(values, (list, tuple)):
        return values
    if isinstance(values, str) or hasattr(values, "__len__"):
        budget.check_items(len(values))
        return list(values)
    items = list(islice(values, budget.limits.max_items + 1))
    budget.check_items(len(items))
    return items


def _spec_width(format_spec: str):
    """Widths and precisions in a format spec: they pad a field up to that size."""
    return sum(int(digits) if len(digits) < 10 else math.inf for digits in _DIGITS.findall(format_spec))


# `+`, `*`, `**` and `%`, which the sandbox routes through call_binop. A guard returns the
# (weight, height) of a list or tuple result, so the result need not be walked again.

def _guard_add(budget: Budget, left, right):
    if isinstance(left, str) and isinstance(right, str):
        budget.check_chars(len(left) + len(right))
    elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        budget.check_items(len(left) + len(right))
        (left_weight, left_height), (right_weight, right_height) = budget.measure(left), budget.measure(right)
        return left_weight + right_weight - 1, max(left_height, right_height)


def _guard_multiply(budget: Budget, left, right):
    if isinstance(left, int) and not isinstance(right, int):
        left, right = right, left
    if isinstance(right, int) and isinstance(left, str):
        budget.check_chars(len(left) * max(right, 0))
    elif isinstance(right, int) and isinstance(left, (list, tuple)):
        budget.check_items(len(left) * max(right, 0))
        weight, height = budget.measure(left)
        return 1 + (weight - 1) * max(right, 0), height
    elif isinstance(right, int) and isinstance(left, int):
        check_bits(left.bit_length() + right.bit_length())


def _guard_power(budget: Budget, left, right) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        check_bits(right * math.log2(abs(left)))


def check_percent(budget: Budget, text, args) -> None:
    """`text % args`: each field's value, width and precision counted before formatting."""
    if not isinstance(text, str):
        return
    positional = iter(args if type(args) is tuple else (args,))
    total = len(text)
    for index, field in enumerate(_PERCENT_FIELD.finditer(text)):
        key, width, precision, kind = field.groups()
        if kind == "%":
            continue
        for size in (width, precision):
            total += _number(next(positional, 0)) if size == "*" else _spec_width(size or "")
        value = args.get(key) if key is not None and isinstance(args, Mapping) else next(positional, None)
        total += budget.text_size(value)
        budget.check_chars(total)
        if index % 1024 == 1023:
            budget.check_time()


BINOP_GUARDS = {"+": _guard_add, "*": _guard_multiply, "**": _guard_power, "%": check_percent}


# str methods whose result can outgrow their inputs: (budget, text, args, kwargs) -> new args or None.

def _guard_width(budget, text, args, kwargs):   # center, ljust, rjust, zfill
    if isinstance(text, str) and args:
        budget.check_chars(max(len(text), _number(args[0])))


def _guard_join(budget, text, args, kwargs):
    if isinstance(text, str) and len(args) == 1:
        items = _bounded_list(budget, args[0])
        sizes = sum(len(item) for item in items if isinstance(item, str))
        budget.check_chars(sizes + len(text) * max(len(items) - 1, 0))
        return (items,)


def _guard_replace(budget, text, args, kwargs):
    if isinstance(text, str) and len(args) >= 2:
        _check_replace(budget, text, args[0], args[1], args[2] if len(args) > 2 else -1)


def _check_replace(budget: Budget, text: str, old, new, count) -> None:
    if isinstance(old, str) and isinstance(new, str):
        hits = text.count(old) if old else len(text) + 1
        hits = min(hits, count) if isinstance(count, int) and count >= 0 else hits
        budget.check_chars(len(text) + max(len(new) - len(old), 0) * hits)


def _guard_split(budget, text, args, kwargs):   # split, rsplit, splitlines: count pieces first
    if isinstance(text, str) and len(text) >= budget.limits.max_items:
        separator = args[0] if args else kwargs.get("sep")
        pieces = text.count(separator) if isinstance(separator, str) and separator else \
            sum(map(text.count, _SEPARATORS))
        maxsplit = _number(args[1] if len(args) > 1 else kwargs.get("maxsplit", -1))
        budget.check_items((min(pieces, maxsplit) if maxsplit >= 0 else pieces) + 1)


METHOD_GUARDS = {"center": _guard_width, "ljust": _guard_width, "rjust": _guard_width, "zfill": _guard_width,
                 "join": _guard_join, "replace": _guard_replace,
                 "split": _guard_split, "rsplit": _guard_split, "splitlines": _guard_split}


class _BoundedFormatting:
    """str.format: each field's width is counted before the field is formatted."""

    total = 0

    def format_field(self, value, format_spec):
        budget = current_budget()
        self.total += budget.text_size(value) + _spec_width(format_spec)
        budget.check_chars(self.total)
        return super().format_field(value, format_spec)


class BoundedFormatter(_BoundedFormatting, SandboxedFormatter):
    pass


class BoundedEscapeFormatter(_BoundedFormatting, SandboxedEscapeFormatter):
    pass


# Filters, which Jinja calls directly: (budget, context, value, *filter args) -> the value to pass on.

def _printed(budget, context, value, *args, **kwargs):   # filters that turn their input into text
    budget.text_size(value)
    return value


def _slow(budget, context, value, *args, **kwargs):   # filters with a Python step per word get a 16th
    if budget.text_size(value) > budget.limits.max_output_chars // 16:
        raise TemplateLimitError(
            f"chat template passes more than {budget.limits.max_output_chars // 16:,} characters to a slow filter")
    return value


def _iterated(budget, context, value, *args, **kwargs):   # filters that list a string's characters
    if isinstance(value, str):
        budget.check_items(len(value))
    return value


def _center(budget, context, value, width=80):
    budget.check_chars(max(budget.text_size(value), _number(width)))
    return value


def _indent(budget, context, value, width=4, *args, **kwargs):
    lines = value.count("\n") + 1 if isinstance(value, str) else budget.text_size(value)
    step = len(width) if isinstance(width, str) else _number(width)
    budget.check_chars(budget.text_size(value) + lines * step)
    return value


def _wordwrap(budget, context, value, width=79, break_long_words=True, wrapstring=None, *args, **kwargs):
    size = budget.text_size(_slow(budget, context, value))   # at most one line break per character
    budget.check_chars(size * (1 + (len(wrapstring) if isinstance(wrapstring, str) else 1)))
    return value


def _format(budget, context, value, *args, **kwargs):
    check_percent(budget, value if isinstance(value, str) else str(_printed(budget, context, value)), kwargs or args)
    return value


def _join(budget, context, value, separator="", attribute=None):
    items = _bounded_list(budget, value)
    shown = items if attribute is None else map(make_attrgetter(context.environment, attribute), items)
    budget.check_chars(sum(map(budget.text_size, shown)) + budget.text_size(separator) * max(len(items) - 1, 0))
    return items


def _replace(budget, context, value, old, new, count=None):
    text = value if isinstance(value, str) else str(_printed(budget, context, value))
    _check_replace(budget, text, str(old), str(new), -1 if count is None else count)
    return value


def _batch(budget, context, value, count, *args, **kwargs):   # batch(n) and slice(n) build n-item lists
    budget.check_items(_number(count))
    return value


def _tojson(budget, context, value, ensure_ascii=False, indent=None, *args, **kwargs):
    weight, height = budget.measure(value)
    step = len(indent) if isinstance(indent, str) else _number(indent)
    if step:   # json's indenting encoder is pure Python
        _slow(budget, context, value)
    budget.check_chars(weight * (1 + step * height))
    return value


@pass_context
def _sum(context, iterable, attribute=None, start=0):
    """Like Jinja's sum, but adds non-numbers one checked `+` at a time (sum() copies lists quadratically)."""
    items = _bounded_list(current_budget(), iterable)
    if attribute is not None:
        items = list(map(make_attrgetter(context.environment, attribute), items))
    if all(type(item) in (int, float, bool) for item in (start, *items)):
        return do_sum(context.environment, items, start=start)
    for item in items:
        start = context.environment.call_binop(context, "+", start, item)
    return start


FILTER_GUARDS = {
    "center": _center, "indent": _indent, "wordwrap": _wordwrap, "format": _format,
    "join": _join, "replace": _replace, "batch": _batch, "slice": _batch, "tojson": _tojson,
    **dict.fromkeys(("pprint", "title", "striptags", "wordcount", "urlencode"), _slow),   # a list item per word
    **dict.fromkeys(("string", "e", "escape", "forceescape", "safe", "lower", "upper", "capitalize", "trim",
                     "xmlattr", "truncate", "int", "float"), _printed),
    **dict.fromkeys(("list", "sort", "unique", "groupby", "dictsort", "min", "max", "first", "last", "random",
                     "reverse", "map", "select", "reject", "selectattr", "rejectattr", "sum"), _iterated),
}


def bound_filter(name: str, func):
    """`func` with its guard run before the call and its result checked after."""
    func = _sum if name == "sum" else func
    guard, pass_arg, built = FILTER_GUARDS.get(name), _PassArg.from_obj(func), name in ("batch", "slice")
    lead = {None: lambda context: (), _PassArg.context: lambda context: (context,),
            _PassArg.eval_context: lambda context: (context.eval_ctx,),
            _PassArg.environment: lambda context: (context.environment,)}[pass_arg]

    @pass_context   # also keeps calls with constant arguments from being folded at compile time
    def bounded(context, value, *args, **kwargs):
        budget = current_budget()
        budget.check_time()
        if guard is not None:
            value = guard(budget, context, value, *args, **kwargs)
        result = func(*lead(context), value, *args, **kwargs)
        return LazyResult(result, budget, built, value) if isinstance(result, Iterator) else budget.account(result)

    return bounded
