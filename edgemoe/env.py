"""Process settings the native libraries read once, when they load."""

from __future__ import annotations

import os


def prepare_environment() -> None:
    """Set before libgomp, ggml or llama.cpp load; never overrides the user."""
    # Busy-waiting OpenMP threads make multi-threaded calls ~100x slower on a
    # loaded 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
