"""Keep numpy's BLAS from competing with ggml's threads.

numpy's OpenBLAS spins its worker threads after each call; on a small machine
they take the cores ggml's compute threads need next (measured here: a decode
step's numpy attention 4x slower between ggml graphs). The glue numpy does
between graphs is small, so one BLAS thread is enough.
"""

from __future__ import annotations

import ctypes
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
