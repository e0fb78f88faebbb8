"""Process memory figures for responses and reports."""

from __future__ import annotations

import resource
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MemoryStats:
    rss_bytes: int
    """Resident set size now."""
    peak_rss_bytes: int
    """Highest resident set size of this process so far."""


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def memory_stats() -> MemoryStats:
    return MemoryStats(rss_bytes(), peak_rss_bytes())


@dataclass(frozen=True)
class StepMetrics:
    """What one generation step (the prompt, or one token) cost."""

    compute_ms: float
    """Time in ggml graph compute."""
    io_ms: float
    """Time the I/O threads spent reading (overlaps compute)."""
    stall_ms: float
    """Time compute waited on I/O."""
    bytes_read: int
    expert_bytes: int
    """Expert weight bytes computed (each chosen expert's planes at the level
    it ran); converted models only, 0 otherwise."""
    hits: dict[int, int]
    """Expert planes found in memory, by the level they complete (bits)."""
    misses: dict[int, int]
    upgrades: int
    """Planes loaded above an expert's resident ones."""
    prefetches: int
    evictions: int
    resident_bytes: dict[int, int]
    """Expert bytes in memory now, by the level of the plane (bits)."""
    rss_bytes: int


@dataclass
class StepTotals:
    """``StepMetrics`` summed over steps (a generation, a bench run, a chat
    turn): the one place reads, stalls and hits are added up for the offload
    line, ``bench`` and the chat's panels."""

    steps: int = 0
    compute_ms: float = 0.0
    io_ms: float = 0.0
    stall_ms: float = 0.0
    bytes_read: int = 0
    expert_bytes: int = 0
    hits: Counter[int] = field(default_factory=Counter)
    misses: Counter[int] = field(default_factory=Counter)
    resident_bytes: dict[int, int] = field(default_factory=dict)
    """The latest step's, by level (what is in memory now, not a sum)."""
    rss_bytes: int = 0
    """The latest step's."""

    @classmethod
    def of(cls, steps: Iterable[StepMetrics]) -> StepTotals:
        totals = cls()
        for m in steps:
            totals.add(m)
        return totals

    def add(self, m: StepMetrics) -> None:
        self.steps += 1
        self.compute_ms += m.compute_ms
        self.io_ms += m.io_ms
        self.stall_ms += m.stall_ms
        self.bytes_read += m.bytes_read
        self.expert_bytes += m.expert_bytes
        self.hits.update(m.hits)
        self.misses.update(m.misses)
        self.resident_bytes = dict(m.resident_bytes)
        self.rss_bytes = m.rss_bytes

    @property
    def hit_rate(self) -> float:
        """Plane hits over all lookups; 0 with none."""
        hits, misses = sum(self.hits.values()), sum(self.misses.values())
        return hits / max(hits + misses, 1)

    def hit_rates(self) -> dict[int, float]:
        """Hit rate by level, ascending, for levels that saw lookups: a level
        no expert ran at (above a forced ``--level``) is not "0% hits"."""
        return {
            lv: self.hits[lv] / (self.hits[lv] + self.misses[lv])
            for lv in sorted(set(self.hits) | set(self.misses))
            if self.hits[lv] + self.misses[lv] > 0
        }


class StepCounter:
    """Turns a model's cumulative counters into per-step StepMetrics."""

    def __init__(self, model):
        self.model = model
        self.levels = model.levels
        self.last = model.counters()

    def step(self) -> StepMetrics:
        now = self.model.counters()
        last, self.last = self.last, now

        def by_level(key: str) -> dict[int, int]:
            return {
                lv: int(a - b) for lv, a, b in zip(self.levels, now[key], last[key])
            }

        return StepMetrics(
            compute_ms=(now["compute_s"] - last["compute_s"]) * 1e3,
            io_ms=(now["io_s"] - last["io_s"]) * 1e3,
            stall_ms=(now["stall_s"] - last["stall_s"]) * 1e3,
            bytes_read=int(now["bytes_read"] - last["bytes_read"]),
            expert_bytes=int(now["expert_bytes"] - last["expert_bytes"]),
            hits=by_level("hits"),
            misses=by_level("misses"),
            upgrades=int(now["upgrades"] - last["upgrades"]),
            prefetches=int(now["prefetches"] - last["prefetches"]),
            evictions=int(now["evictions"] - last["evictions"]),
            resident_bytes=dict(zip(self.levels, now["resident"])),
            rss_bytes=rss_bytes(),
        )
