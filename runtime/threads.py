"""Keep numpy's BLAS from competing with ggml's threads.

numpy's OpenBLAS spins its worker threads after each call; on a small machine
they take the cores ggml's compute threads need next (measured here: a decode
step's numpy attention 4x slower between ggml graphs). The glue numpy does
between graphs is small, so one BLAS thread is enough.
"""

from __future__ import annotations

import ctypes
import os
import re

_SYMBOLS = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
)
_done = False


def limit_blas_threads(n: int = 1) -> bool:
    """Set the loaded OpenBLAS's thread count; False if none was found."""
    global _done
    if _done:
        return True
    import numpy  # noqa: F401  (its BLAS must be loaded to be found)

    try:
        with open("/proc/self/maps") as fh:
            libs = set(re.findall(r"(/\S*openblas\S*\.so\S*)", fh.read()))
    except OSError:
        return False
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _SYMBOLS:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn(n)
                _done = True
                return True
    return False


class ThreadTuner:
    """The compute thread count that measures fastest right now, per step.

    ggml's CPU threads meet at a spinning barrier after every node. When
    other work holds a core (another process, our own I/O threads), one of
    them is descheduled and the others spin until the scheduler brings it
    back: on a busy 2-core machine 2-thread decoding measured 8-9x slower
    than 1 thread (benchmarks/bench_stability.py); on a quiet one two
    threads are faster. No
    fixed count suits both, and the load changes while a model runs.

    So a decode step (one token, every graph of it) runs with one count;
    each graph keeps a moving average of its time per count. Now and then a
    whole step runs with another count (a probe): the step's graph times
    over their averages at the current count say whether it is faster.
    Whole steps, because a count also costs at the switches between graphs
    (OpenMP workers waking). Probes are paid from a budget: their expected
    cost may not exceed ``PROBE_SHARE`` of all compute time, and a probe
    with more threads waits while other processes hold the cores it needs,
    so a count that has turned out slow is tried ever more rarely.
    """

    FIRST_PROBE = 4
    MAX_INTERVAL = 256
    ALPHA = 0.25
    MARGIN = 0.9
    """A probe must beat the current count by 10% to take over (noise)."""
    PROBE_SHARE = 0.03

    def __init__(self, n_max: int, fixed: bool, start: int | None = None):
        """``start``: the first count (default: ``n_max`` less the cores
        other runnable tasks hold now); given, it also skips the load check
        before probes (for tests)."""
        self.choices = [n_max] if fixed or n_max == 1 else _halvings(n_max)
        self.check_load = start is None and len(self.choices) > 1
        first = start or (self.choices[0] if fixed else _free_cores(n_max))
        self.best = min(self.choices, key=lambda n: abs(n - first))
        self.threads = self.best
        """The count graphs run with now."""
        self.calls = {n: 0 for n in self.choices}
        """Graph computes run with each thread count."""
        self.compute_s = 0.0
        self.probe_s = 0.0
        self.ratio = {n: 2.0 for n in self.choices}
        """Step time at each count over the time at the best: what a probe
        is expected to cost."""
        self.steps = 0
        self.next_probe = self.FIRST_PROBE
        self.interval = self.FIRST_PROBE
        self._probe_i = 0
        self._probing = False
        self._step: list[tuple[GraphTiming, float]] | None = None
        self._last_step_s = 0.0
        self._urgent: int | None = None
        self._tried = {self.best}

    def new_state(self) -> GraphTiming:
        return GraphTiming()

    def begin_step(self) -> None:
        """A decode step starts: pick its count."""
        self._step = []
        self._probing = False
        self.threads = self.best
        if len(self.choices) == 1:
            return
        self.steps += 1
        if self.steps < self.next_probe:
            return
        # After a step slower than another count's last measure, that count
        # is expected to save time: its probe needs no budget.
        urgent, self._urgent = self._urgent, None
        alt = urgent or self._alternative()
        if urgent is None:
            # More threads on free cores cost about par; the load check
            # below stops a probe where they are not free.
            more = alt > self.best and self.check_load
            expected = self._last_step_s * (1.0 if more else self.ratio[alt])
            # Each count's first probe is free: fewer threads cost at most
            # best/alt times a step, and more pass the load check first.
            tried = alt in self._tried
            if tried and self.probe_s + expected > self.PROBE_SHARE * self.compute_s:
                return
            if more and _free_cores(alt) < alt:
                # Other processes hold the cores more threads would need: such
                # a probe would stall at every barrier (tens of ms). Later.
                self._backoff()
                return
        self.threads, self._probing = alt, True
        self._tried.add(alt)

    def _alternative(self) -> int:
        others = [n for n in self.choices if n != self.best]
        self._probe_i = (self._probe_i + 1) % len(others)
        return others[self._probe_i]

    def _backoff(self) -> None:
        self.interval = min(2 * self.interval, self.MAX_INTERVAL)
        self.next_probe = self.steps + self.interval

    def record(self, g: GraphTiming, seconds: float) -> None:
        """A graph computed with ``self.threads`` in ``seconds``."""
        n = self.threads
        self.calls[n] = self.calls.get(n, 0) + 1
        self.compute_s += seconds
        if not g.warm:
            g.warm = True  # the first call builds caches and pages weights in
            return
        old = g.ema.get(n)
        # A probe's sample replaces an old one: that may date from another load.
        keep = old is not None and n == self.best
        g.ema[n] = old + self.ALPHA * (seconds - old) if keep else seconds
        if self._step is not None:
            self._step.append((g, seconds))

    def end_step(self) -> None:
        """The step is done: judge a probe, or watch for a change of load."""
        step, self._step = self._step, None
        n, best = self.threads, self.best
        self.threads = best  # prefill between steps runs with the best
        if not step or len(self.choices) == 1:
            return
        total = sum(sec for _, sec in step)
        if not self._probing:
            self._last_step_s = total
            for alt in self.choices:
                known = [(g.ema[alt], sec) for g, sec in step if alt in g.ema]
                if alt != n and known and len(known) == len(step):
                    if self.MARGIN * total > sum(t for t, _ in known):
                        # Slower than another count's last measure: the load
                        # changed; probe that count at once.
                        self.next_probe = self.steps + 1
                        self._urgent = alt
            return
        self.probe_s += total
        pairs = [(g.ema[best], sec) for g, sec in step if best in g.ema]
        if not pairs:
            return
        r = sum(sec for _, sec in pairs) / sum(t for t, _ in pairs)
        if r < self.MARGIN:
            self.ratio[best], self.ratio[n] = 1.0 / r, 1.0
            self.best = self.threads = n
            self.interval = self.FIRST_PROBE
            self.next_probe = self.steps + self.interval
        else:
            self.ratio[n] += 0.5 * (r - self.ratio[n])
            self._backoff()

    def summary(self) -> dict[int, float]:
        """Share of graph computes run with each thread count."""
        total = sum(self.calls.values()) or 1
        return {n: c / total for n, c in self.calls.items() if c}


class GraphTiming:
    """One graph's moving average of compute time per thread count."""

    __slots__ = ("ema", "warm")

    def __init__(self) -> None:
        self.ema: dict[int, float] = {}
        self.warm = False


def _halvings(n: int) -> list[int]:
    """n, n/2, ... 1: the counts worth trying (most first)."""
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _free_cores(
    n_max: int,
    loadavg: str | os.PathLike = "/proc/loadavg",
    tasks: str | os.PathLike = "/proc/self/task",
) -> int:
    """Cores that other processes' runnable tasks leave free right now (at
    least 1, at most ``n_max``): the running count in /proc/loadavg less this
    process's own running threads."""
    try:
        with open(loadavg) as fh:
            running = int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return n_max
    own = 0
    try:
        for tid in os.listdir(tasks):
            try:
                with open(os.path.join(tasks, tid, "stat")) as fh:
                    # "pid (comm) S ...": the state follows the last ")".
                    own += fh.read().rpartition(")")[2].split()[0] == "R"
            except (OSError, IndexError):
                continue
    except OSError:
        own = 1  # at least the thread reading this
    others = max(0, running - max(own, 1))
    return max(1, min(n_max, (os.cpu_count() or n_max) - others))
