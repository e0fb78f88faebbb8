"""Process memory figures for responses and reports."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass


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
