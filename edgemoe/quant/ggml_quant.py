"""Quantize rows with ggml's own C quantizers (llama.cpp's, through our
binding): block types as llama.cpp writes them, importance-weighted where a
type takes an imatrix, at C speed.

Used by the converter (the backbone; a plane whose type has no numpy fit,
see kquants.quantize_quick) and the GGUF exporter.
ctypes releases the GIL for the call, so callers quantize in threads; a
large tensor is also split by rows across the cores here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgemoe.errors import ConfigError

SPLIT_VALUES = 1 << 21
"""Tensors above this many values are quantized in row chunks on every core
(the backbone's head, embeddings and 2048 x 2048 attention matrices, which
nothing else runs beside); smaller ones in one call, since the converter
already runs experts side by side."""


def importance(imatrix: np.ndarray, k: int) -> np.ndarray:
    """Checked column importance [K] (float32, contiguous), floored: a column
    never activated still needs a sane fit."""
    imp = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if imp.shape != (k,) or not np.isfinite(imp).all() or (imp < 0).any():
        raise ConfigError(
            f"the importance matrix must be {k} finite non-negative values"
        )
    return np.maximum(imp, np.float32(1e-8) * max(float(imp.mean()), 1e-30))


def quantize(
    x: np.ndarray,
    ggml_type: int,
    imatrix: np.ndarray | None = None,
    *,
    fit: bool = True,
) -> np.ndarray:
    """Rows ``x`` [R, K] (float32, K whole blocks of ``ggml_type``) -> block
    bytes [R, row_bytes].

    ``fit``: ggml's searched, importance-weighted fit (``quantize_row_*_impl``)
    with ``imatrix`` [K], each column's importance (mean squared input; None:
    uniform); else its reference rounding (``quantize_row_*_ref``, twice as
    fast, no weights). Types without a weighted fit (Q8_0) ignore both."""
    from edgemoe.ggml_binding import lib

    g = lib()
    if x.ndim != 2:
        raise ConfigError(f"quantize: rows must be 2-D, got shape {list(x.shape)}")
    r, k = x.shape
    block = g.ggml_blck_size(ggml_type)
    if k % block:
        raise ConfigError(
            f"{g.ggml_type_name(ggml_type).decode()} needs rows of a multiple of "
            f"{block} values, got shape {list(x.shape)}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(
            f"{g.ggml_type_name(ggml_type).decode()}: the tensor has NaN or "
            "infinite values"
        )
    if imatrix is None:
        # ggml takes "no weights" as "use the reference rounding".
        imatrix = np.ones(k, dtype=np.float32)
    imat = importance(imatrix, k)
    out = np.empty((r, g.ggml_row_size(ggml_type, k)), dtype=np.uint8)
    src, dst = x.ctypes.data, out.ctypes.data
    weights = imat.ctypes.data if fit else None

    def rows(start: int, stop: int) -> None:
        g.ggml_quantize_chunk(ggml_type, src, dst, start * k, stop - start, k, weights)

    workers = min(os.cpu_count() or 1, r) if x.size > SPLIT_VALUES else 1
    if workers <= 1:
        rows(0, r)
        return out
    step = -(-r // workers)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda a: rows(a, min(a + step, r)), range(0, r, step)))
    return out
