"""Token embedding rows for a step's input, read where the table lies.

A converted or read GGUF keeps its embedding table in the file (FileWeight):
a step reads its tokens' rows through one open fd; a mapped table is indexed
in place. Either way the rows are dequantized by ggml's own C routine for
the table's type (numpy's dequantizer took a third of a small model's host
time per token).
Legend: T tokens, D hidden.
"""

from __future__ import annotations

import numpy as np

from edgemoe.checkpoint.base import GGML_F32, FileRows, FileWeight, Weight


class EmbeddingRows:
    def __init__(self, table: Weight, g):
        """``g``: the ggml binding (edgemoe/ggml_binding.py)."""
        self.table = table
        self._src = FileRows(table) if isinstance(table, FileWeight) else table
        self._to_float = None if table.qtype == GGML_F32 else g.to_float_fn(table.qtype)
        """ggml's dequantizer; None: F32 rows are copied, and a type whose
        traits the binding cannot read goes through numpy."""

    def into(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Rows ``ids`` [T] into ``out`` [T, D] (float32, C-contiguous)."""
        raw = self._src.raw_rows(ids)
        if self._to_float is not None:
            self._to_float(raw.ctypes.data, out.ctypes.data, out.size)
        elif self.table.qtype == GGML_F32:
            out[...] = raw
        else:
            t = self.table
            out[...] = Weight(t.name, t.qtype, out.shape, raw).to_float32()

    def close(self) -> None:
        if isinstance(self._src, FileRows):
            self._src.close()
