"""Process settings the native libraries read once, when they load."""

from __future__ import annotations

import os

SPINCOUNT = 100_000
"""libgomp busy-wait iterations before a worker thread sleeps."""


def prepare_environment() -> None:
    """Set before libgomp, ggml or llama.cpp load; never overrides the user."""
    # Unbounded busy-waiting made multi-threaded calls ~100x slower on a loaded
    # 2-core machine; sleeping at once costs a thread wake-up per graph (about
    # 0.5 ms in a VM, 4x a 4 MB matvec), and a token runs a dozen graphs. So:
    # sleep, but spin briefly first (about a millisecond) to bridge the gaps.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPINCOUNT)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
