"""What a long command shows while it works, for the CLI's commands.

The library reports progress as calls ``progress(stage, i, n)`` ("layer 3 of
16", "experts 12 of 64"); a ``Progress`` turns them into one overall fraction
(``fraction``, the command's own model of where the time goes) and shows it:
a rich bar with a moving ETA on a terminal, a plain line every few seconds
when stderr is a pipe or a file (CI logs, ``2> log``). Nothing here knows the
runtime; the command decides the stages and their weights.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

Fraction = Callable[[str, int, int], "float | None"]
Describe = Callable[[str, int, int], str]


def clock(seconds: float) -> str:
    """``1:05`` or ``1:02:03``."""
    s = max(int(seconds), 0)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """Callable as the library's ``progress(stage, i, n)``; ``close()`` stops
    the display (also on Ctrl+C, so no bar is left on the terminal)."""

    def __init__(
        self,
        label: str,
        fraction: Fraction,
        describe: Describe,
        stream: TextIO | None = None,
        every: float = 5.0,
        tty: bool | None = None,
    ):
        self.label = label
        self.fraction = fraction
        self.describe = describe
        self.stream = stream or sys.stderr
        self.every = every
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.monotonic()
        self.done = 0.0
        # The first line after ``every`` seconds: a quick command (or one
        # that fails at once) prints nothing but its result or its error.
        self._last_line = self.start
        self._bar = None
        self._task = None

    def eta(self) -> float | None:
        """Seconds left at the pace so far (None until there is a pace)."""
        elapsed = time.monotonic() - self.start
        if self.done <= 0.01 or elapsed < 1.0:
            return None
        return elapsed * (1 - self.done) / self.done

    def line(self, what: str) -> str:
        elapsed = time.monotonic() - self.start
        eta = self.eta()
        left = f", about {clock(eta)} left" if eta is not None else ""
        return f"{self.label}: {self.done:.0%} ({what}), {clock(elapsed)} elapsed{left}"

    def __call__(self, stage: str, i: int, n: int) -> None:
        f = self.fraction(stage, i, n)
        if f is not None:
            self.done = min(max(f, self.done), 1.0)
        what = self.describe(stage, i, n)
        if self.tty:
            self._show_bar(what)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            print(self.line(what), file=self.stream, flush=True)

    def _show_bar(self, what: str) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=self.stream),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=1.0, status="")
        elapsed = time.monotonic() - self.start
        eta = self.eta()
        status = f"{self.done:.0%} {what} · {clock(elapsed)}" + (
            f" · ~{clock(eta)} left" if eta is not None else ""
        )
        self._bar.update(self._task, completed=self.done, status=status)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
