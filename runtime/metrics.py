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
