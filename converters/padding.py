"""Expert matrices padded to whole plane blocks (256 weights for the
K-quants): an FFN width with zero rows (gate, up) and columns (down), a hidden
width with zero columns (gate, up) and rows (down), gpt-oss's 2,880 -> 3,072.
Padded rows output zero and the runtime pads the activations with zeros, so
the model computes what it did."""

from __future__ import annotations

import math

import numpy as np


def padded_width(n: int, plan) -> int:
    """``n`` up to whole blocks of ``plan``'s planes."""
    return math.ceil(n / plan.block) * plan.block


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    out = np.zeros((rows, x.shape[1]), dtype=np.float32)
    out[: x.shape[0]] = x
    return out


def pad_cols(x: np.ndarray, cols: int, fill: float = 0.0) -> np.ndarray:
    if x.shape[1] == cols:
        return x
    out = np.full((x.shape[0], cols), fill, dtype=np.float32)
    out[:, : x.shape[1]] = x
    return out
