"""Reference quantizers the nested planes are measured against (float in, float
out): round-to-nearest on a per-group min/max grid, and the top bits sliced
from a per-group int8 grid (the naive way to nest precisions)."""

from __future__ import annotations

import numpy as np


def _groups(w: np.ndarray, group: int):
    x = w.reshape(w.shape[0], -1, group)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    return x, lo, hi


def rtn_minmax(w: np.ndarray, bits: int, group: int = 64) -> np.ndarray:
    """Round-to-nearest on 2**bits levels spanning each group's min..max."""
    x, lo, hi = _groups(w, group)
    levels = 2**bits - 1
    s = np.where(hi > lo, (hi - lo) / levels, 1)
    q = np.clip(np.round((x - lo) / s), 0, levels)
    return (q * s + lo).reshape(w.shape).astype(np.float32)


def sliced_int8(w: np.ndarray, bits: int, group: int = 64) -> np.ndarray:
    """The top ``bits`` of a per-group min/max int8 grid (rounded)."""
    x, lo, hi = _groups(w, group)
    s = np.where(hi > lo, (hi - lo) / 255, 1)
    q8 = np.clip(np.round((x - lo) / s), 0, 255)
    step = 2 ** (8 - bits)
    q = np.clip(np.round(q8 / step), 0, 2**bits - 1) * step
    return (q * s + lo).reshape(w.shape).astype(np.float32)


class ExpertsTransformed:
    """A checkpoint whose routed-expert matrices pass through ``transform``
    (a float [N, K] -> [N, K] function) as they load: how the baselines are
    evaluated with the same runtime as everything else."""

    def __init__(self, ckpt, transform):
        self._ckpt = ckpt
        self._transform = transform

    def __getattr__(self, name):
        return getattr(self._ckpt, name)

    def load(self, name: str):
        from edgemoe.checkpoint.base import Weight, aligned_empty, is_expert_matrix

        w = self._ckpt.load(name)
        if not is_expert_matrix(name):
            return w
        out = aligned_empty(w.shape, np.float32)
        for e in range(w.shape[0]):
            out[e] = self._transform(w.to_float32()[e] if w.qtype else w.data[e])
        return Weight(name, 0, w.shape, out)
