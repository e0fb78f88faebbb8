"""The jinja2 sandbox chat templates run in, with limits on time and size.

jinja2's sandbox stops a template from reaching Python's internals, but not
from spending the machine: nested ``range`` loops run for hours,
``'%0999999999d' % 1`` or ``"x"|center(10**9)`` allocate a gigabyte, and
``10**10**10`` never finishes. A chat template needs milliseconds and
kilobytes, so each of those is bounded here, and going past a bound is a
``TemplateLimit`` (rendered by ``render_chat`` as a ConfigError naming the
template).

Only jinja2 is imported lazily (by ``sandbox_class``); importing this module
imports nothing heavy.
"""

from __future__ import annotations

import operator
import re
import time
from collections.abc import Sequence
from typing import Any

TIME_LIMIT_S = 2.0
"""Real templates render a conversation in well under 10 ms."""
MAX_OUTPUT = 8 << 20
"""Characters of rendered prompt: more than any context window holds."""
MAX_ITEMS = 1 << 20
"""Length of a string or list a template may build by ``*``."""
MAX_WIDTH = 4096
"""Field width or precision in a format spec, and filter widths."""
MAX_INT_BITS = 1 << 16
"""Size of an integer a template may compute (``**``, ``*``, ``<<``)."""


class TemplateLimit(Exception):
    """A template went past one of the limits above."""


# "%-08.3f", "%(name)5s", "%*d": the width/precision of each %-conversion.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
# "{0:>9999}", "{:{w}}": the spec of each replacement field.
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)(\{?)")


def _check_width(n: Any, what: str) -> None:
    if isinstance(n, int) and abs(n) > MAX_WIDTH:
        raise TemplateLimit(f"{what} {n} is over the limit of {MAX_WIDTH}")


def _digits(text: str) -> int:
    # int() of thousands of digits is itself slow (and capped by Python).
    return int(text) if len(text) <= 9 else 10**9


def check_percent_format(fmt: Any) -> None:
    """Refuse a ``%`` format whose widths could allocate without bound."""
    if not isinstance(fmt, str):
        return
    for m in _PERCENT.finditer(fmt):
        for part in m.groups():
            if part == "*":
                raise TemplateLimit("a '*' width in a % format is not allowed")
            if part:
                _check_width(_digits(part), "% width")


def check_brace_format(fmt: Any) -> None:
    """The same for ``str.format`` specs; nested ``{}`` in a spec refused."""
    if not isinstance(fmt, str):
        return
    for m in _BRACE_SPEC.finditer(fmt):
        spec, nested = m.groups()
        if nested:
            raise TemplateLimit("a nested {} in a format spec is not allowed")
        for digits in re.findall(r"\d+", spec):
            _check_width(_digits(digits), "format width")


def _int_bits(x: Any) -> int:
    return x.bit_length() if isinstance(x, int) else 0


class Budget:
    """The time one render may take; checked at every loop step over a
    ``range``, operator, call and output chunk."""

    def __init__(self, seconds: float = TIME_LIMIT_S):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering took longer than {self.seconds:g} s")


class TimedRange(Sequence):
    """``range`` for templates: jinja2's 100,000-item cap, plus the time
    budget on each step (nested loops multiply)."""

    def __init__(self, budget: Budget, *args: int):
        from jinja2.sandbox import safe_range

        self._r = safe_range(*args)
        self._budget = budget

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i):
        return self._r[i]

    def __iter__(self):
        check = self._budget.check
        for n, x in enumerate(self._r):
            if not n & 255:
                check()
            yield x

    def __reversed__(self):
        back = TimedRange.__new__(TimedRange)
        back._r, back._budget = self._r[::-1], self._budget
        return iter(back)


def _checked_binop(op: str, left: Any, right: Any) -> Any:
    if op == "**":
        if isinstance(left, int) and isinstance(right, int):
            if right > 0 and _int_bits(left) * right > MAX_INT_BITS:
                raise TemplateLimit(f"{left} ** {right} is over the integer limit")
    elif op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                if len(seq) * n > MAX_ITEMS:
                    raise TemplateLimit(
                        f"a sequence of {len(seq)} items times {n} is over "
                        f"the limit of {MAX_ITEMS}"
                    )
        if _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
            raise TemplateLimit("a product over the integer limit")
    elif op == "%":
        check_percent_format(left)
    return _BINOPS[op](left, right)


_BINOPS = {
    "**": operator.pow,
    "*": operator.mul,
    "%": operator.mod,
}


def _width_filter(env, name: str, arg: int):
    """Filter ``name`` with its width-like argument (position ``arg``)
    capped: ``center(10**9)`` would allocate a gigabyte."""
    import functools

    base = env.filters[name]
    # Filters that take jinja's context (tojson) get it as a first argument;
    # update_wrapper copies the marker that tells jinja to pass it.
    arg += hasattr(base, "jinja_pass_arg")

    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > arg:
            _check_width(args[arg], f"{name} width")
        for v in kwargs.values():
            _check_width(v, f"{name} width")
        return base(*args, **kwargs)

    return functools.update_wrapper(checked, base)


def sandbox_class():
    """The sandbox class (built once, importing jinja2 then)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(_BINOPS)

        def __init__(self, budget: Budget, **kwargs: Any):
            super().__init__(**kwargs)
            self.budget = budget
            self.globals["range"] = lambda *a: TimedRange(budget, *a)
            for name, arg in (
                ("center", 1),
                ("indent", 1),
                ("wordwrap", 1),
                ("tojson", 1),  # indent=10**9 built gigabytes
            ):
                self.filters[name] = _width_filter(self, name, arg)
            lipsum = self.globals["lipsum"]

            def limited_lipsum(n: int = 5, *args: Any, **kwargs: Any) -> Any:
                # lipsum(10**9) generated paragraphs for minutes.
                _check_width(n * 100, "lipsum paragraphs x 100")
                for v in (*args, *kwargs.values()):
                    _check_width(v, "lipsum size")
                return lipsum(n, *args, **kwargs)

            self.globals["lipsum"] = limited_lipsum
            fmt = self.filters["format"]

            def format_filter(value: Any, *args: Any, **kwargs: Any) -> Any:
                check_percent_format(value)
                return fmt(value, *args, **kwargs)

            self.filters["format"] = format_filter

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # jinja2 answers with an undefined that renders as nothing; a
            # template probing for an escape is refused at the access instead.
            raise SecurityError(
                f"access to attribute {attribute!r} of "
                f"{type(obj).__name__!r} object is unsafe"
            )

        def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
            self.budget.check()
            return _checked_binop(op, left, right)

        def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            __self.budget.check()
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value: Any):
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                check_brace_format(value.__self__)
            return wrapped

    _CLASS = LimitedSandbox
    return _CLASS


_CLASS: Any = None


def render_limited(template: str, budget: Budget, **variables: Any) -> str:
    """Render with every limit; output is collected chunk by chunk so that
    its size and the time are checked while it grows."""
    env = sandbox_class()(budget, trim_blocks=True, lstrip_blocks=True)
    for name, fn in variables.pop("_globals", {}).items():
        env.globals[name] = fn
    tmpl = env.from_string(template)
    out, size = [], 0
    for chunk in tmpl.generate(**variables):
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise TemplateLimit(f"output is over the limit of {MAX_OUTPUT} characters")
        out.append(chunk)
        budget.check()
    return "".join(out)
