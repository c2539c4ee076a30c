"""Bounds on rendering a chat template: output size, running time and nesting depth.

A template renders once per request, so one that loops for minutes, builds a string of
gigabytes or recurses without end is a per-request denial of service. This module holds the
per-render Budget, the context variable the sandbox's hooks find it through, the loop, lazy
and internal-filter wrappers, and the checks on output and ranges; template_guards predicts
the size of each operator, method and filter result before it is made. Each value is checked
before it is made (where its size can be predicted) or right after; loops, calls and
comparisons check the clock. A broken bound raises TemplateLimitError with a one-line
message, and nothing keeps running after it (there is no watchdog thread).
"""
from __future__ import annotations

import math
import time
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass
from functools import update_wrapper
from itertools import chain

from jinja2.runtime import markup_join, str_join
from jinja2.utils import Namespace, pass_context

_now = time.monotonic
_MEMO_MIN_WEIGHT = 64   # smaller containers are cheap to measure again
_MAX_INT_BITS = 1 << 16
_SCALARS = frozenset((int, float, bool, type(None)))
# Methods no chat template needs that make bytes or grow text by a table: refused by the sandbox.
BLOCKED_METHODS = frozenset(("encode", "to_bytes", "translate", "maketrans", "expandtabs", "hex"))


class TemplateLimitError(Exception):
    """A template went past one of its bounds; the message is one line for the user."""


@dataclass(frozen=True)
class TemplateLimits:
    max_output_chars: int = 4 * 1024 * 1024   # the output, and any one string or container built
    max_seconds: float = 0.5
    max_depth: int = 64   # macro and recursive-loop calls, template nesting, value nesting

    @property
    def max_items(self) -> int:   # items in one list, tuple or dict
        return max(self.max_output_chars // 16, 16)

    @property
    def max_allocated(self) -> int:   # about the bytes of all values one render builds
        return self.max_output_chars * 16

    @property
    def max_source_chars(self) -> int:   # the largest real templates have about 20,000
        return max(self.max_output_chars // 16, 1024)

    def too_deep(self) -> TemplateLimitError:
        return TemplateLimitError(f"chat template nests deeper than {self.max_depth}")


class Budget:
    """What one render (or compile) has used so far."""

    __slots__ = ("limits", "deadline", "max_chars", "max_allocated", "depth", "allocated", "weights")

    def __init__(self, limits: TemplateLimits, seconds: float):
        self.limits, self.deadline = limits, _now() + seconds
        self.max_chars, self.max_allocated = limits.max_output_chars, limits.max_allocated
        self.depth = self.allocated = 0
        self.weights: dict[int, tuple[object, int, int]] = {}   # id -> (value kept alive, weight, height)

    def check_time(self) -> None:
        if _now() > self.deadline:
            raise TemplateLimitError(f"chat template ran longer than {self.limits.max_seconds:g} s")

    def check_chars(self, count) -> None:
        if count > self.limits.max_output_chars:
            raise TemplateLimitError(f"chat template output exceeds {self.limits.max_output_chars:,} characters")

    def check_items(self, count) -> None:
        if count > self.limits.max_items:
            raise TemplateLimitError(f"chat template builds a list of more than {self.limits.max_items:,} items")

    def too_deep(self) -> TemplateLimitError:
        return self.limits.too_deep()

    def allocate(self, size: int) -> None:
        self.allocated += size
        if self.allocated > self.max_allocated:
            raise TemplateLimitError(f"chat template allocates more than {self.max_allocated:,} bytes")

    def account(self, value, new: bool = True, measure: bool = True):
        """Check a value the template just got; `new` ones count towards the allocation total, and
        `measure=False` skips weighing a copy of part of a value (a slice)."""
        if type(value) is str or isinstance(value, str):
            if len(value) > self.max_chars:
                self.check_chars(len(value))
            if new:
                self.allocated += len(value) if value.isascii() else 4 * len(value)
                if self.allocated > self.max_allocated:
                    self.allocate(0)
        elif isinstance(value, (list, tuple, dict)):
            self.check_items(len(value))
            if measure:
                self.measure(value)
            if new:   # a slot, a small object per item, and the strings a split or partition made
                items = value.values() if isinstance(value, dict) else value
                self.allocate((100 if isinstance(value, dict) else 40) * len(value)
                              + sum(len(item) for item in items if type(item) is str))
        elif type(value) is int:
            check_bits(value.bit_length())
        elif isinstance(value, Namespace) and new:   # namespace(d) copies d
            self.allocate(100 * len(object.__getattribute__(value, "_Namespace__attrs")))
        return value

    def measure(self, value, level: int = 0) -> tuple[int, int]:
        """(weight, height): characters plus items, shared parts counted each time they appear (what
        printing, comparing or hashing it costs), and how many containers deep it nests."""
        if isinstance(value, str):
            return len(value), 0
        if isinstance(value, (list, tuple, dict)):
            cached = self.weights.get(id(value))
            if cached is not None:
                if level + cached[2] > self.limits.max_depth:
                    raise self.too_deep()
                return cached[1], cached[2]
            children = chain.from_iterable(value.items()) if isinstance(value, dict) else value
        elif isinstance(value, Namespace):   # mutable, so never cached
            children = object.__getattribute__(value, "_Namespace__attrs").values()
        elif isinstance(value, (KeysView, ValuesView, ItemsView)):
            return self.measure(value.mapping, level)
        else:
            return 1, 0
        if level >= self.limits.max_depth:
            raise self.too_deep()
        weight, height = 1, 1
        for child in children:
            kind = type(child)
            if kind is str:
                weight += len(child)
            elif kind in _SCALARS:
                weight += 1
            else:
                child_weight, child_height = self.measure(child, level + 1)
                weight, height = weight + child_weight, max(height, child_height + 1)
            if weight > self.max_chars:
                self.check_chars(weight)
        if weight >= _MEMO_MIN_WEIGHT and not isinstance(value, Namespace):
            self.remember(value, weight, height)
        return weight, height

    def remember(self, value, weight: int, height: int):
        """Record the measure of a container (one `+` or `*` made it from measured parts)."""
        self.check_chars(weight)
        if height > self.limits.max_depth:
            raise self.too_deep()
        if weight >= _MEMO_MIN_WEIGHT:
            self.weights[id(value)] = (value, weight, height)
            self.allocate(64)
        return value

    def text_size(self, value) -> int:
        """About how many characters str(value) has, checked before it is made."""
        if isinstance(value, str):
            return len(value)
        if type(value) is int:
            return value.bit_length() // 3 + 2
        if type(value) is float:
            return 320   # '%f' % 1e308
        size = self.measure(value)[0]
        self.check_chars(size)
        return size


# Hooks find the budget of the render running on their thread (or asyncio task) here.
_BUDGET: ContextVar[Budget] = ContextVar("chat_template_budget")


def with_budget(budget: Budget, function, *args):
    token = _BUDGET.set(budget)
    try:
        return function(*args)
    finally:
        _BUDGET.reset(token)


current_budget = _BUDGET.get


def bounded_join(chunks, budget: Budget) -> str:
    """"".join(chunks), refused as soon as the running total passes the bound."""
    total, parts, limit = 0, [], budget.max_chars
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            budget.check_chars(total)
        parts.append(chunk)
    return "".join(parts)


def check_bits(bits) -> None:
    if bits > _MAX_INT_BITS:
        raise TemplateLimitError(f"chat template builds a number larger than {_MAX_INT_BITS:,} bits")


SLOW_TESTS = frozenset(("in", "==", "eq", "equalto", "!=", "ne", "<", "lt", "lessthan", "<=", "le", ">", "gt",
                        "greaterthan", ">=", "ge", "lower", "upper"))


class _BoundedLoop:
    """The iterable of a `{% for %}`: checks the clock on every item (a loop body may make no call
    at all), and keeps len() so `loop.length` and `loop.last` work as before."""

    __slots__ = ("_items", "_budget")

    def __init__(self, items, budget: Budget):
        self._items, self._budget = items, budget

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        budget = self._budget
        budget.check_time()
        for item in self._items:
            if _now() > budget.deadline:
                budget.check_time()
            yield item


class LazyResult:
    """A filter's lazy result (map, select, batch...): at most max_items pass, the lists batch and
    slice build (which may repeat their fill value) are checked, and chains are at most max_depth."""

    __slots__ = ("_items", "_budget", "_built", "_count", "_chain")

    def __init__(self, items: Iterator, budget: Budget, built: bool, source):
        self._chain = source._chain + 1 if type(source) is LazyResult else 1
        if self._chain > budget.limits.max_depth:
            raise budget.too_deep()
        self._items, self._budget, self._built, self._count = items, budget, built, 0

    def __iter__(self):
        return self

    def __next__(self):
        item, budget = next(self._items), self._budget
        self._count += 1
        if self._count > budget.limits.max_items or _now() > budget.deadline:
            budget.check_items(self._count)
            budget.check_time()
        return budget.account(item) if self._built else item


def bound_test(func):
    def bounded(*args, **kwargs):
        _BUDGET.get().check_time()
        return func(*args, **kwargs)
    return update_wrapper(bounded, func)


@pass_context
def _loop(context, items):
    return _BoundedLoop(items, _BUDGET.get())


@pass_context
def _concat(context, parts):   # `a ~ b ~ c`, sizes checked before the join
    budget = _BUDGET.get()
    budget.check_time()
    budget.check_chars(sum(map(budget.text_size, parts)))
    return budget.account((markup_join if context.eval_ctx.autoescape else str_join)(parts))


@pass_context
def _tick(context, value):   # after a comparison: each costs at most one bounded pass
    if _now() > _BUDGET.get().deadline:
        _BUDGET.get().check_time()
    return value


@pass_context
def _built(context, value):   # a literal: shared parts multiply its weight
    return _BUDGET.get().account(value)


@pass_context
def _sliced(context, value):   # a copy of part of a value: new memory, no more weight than the value
    return _BUDGET.get().account(value, measure=False)


# Filters the compiled template calls around loops, `~`, comparisons, literals and slices (see
# chat_template's _BoundsRewriter); the space in their names keeps them out of template syntax.
LOOP, CONCAT, TICK, BUILT, SLICED = "bounded loop", "bounded concat", "bounded tick", "bounded built", "bounded slice"
INTERNAL_FILTERS = {LOOP: _loop, CONCAT: _concat, TICK: _tick, BUILT: _built, SLICED: _sliced}


def finalize(value):   # every `{{ value }}`, before str(): a container's text is bounded first
    if type(value) is not str:
        budget = _BUDGET.get()
        budget.check_time()
        budget.text_size(value)
    return value


def join_buffer(parts) -> str:   # macro, call, set and filter blocks join their output here
    budget = _BUDGET.get()
    budget.check_time()
    if isinstance(parts, list):
        budget.check_chars(sum(map(len, parts)))
        return budget.account("".join(parts))
    return budget.account(bounded_join(parts, budget))


def bounded_range(*args) -> range:
    numbers = range(*args)
    try:
        _BUDGET.get().check_items(len(numbers))
    except OverflowError:
        _BUDGET.get().check_items(math.inf)
    return numbers
