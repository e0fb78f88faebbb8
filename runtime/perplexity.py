"""Perplexity over a text, in independent fixed-size windows.

The text is tokenized once (no special tokens) and cut into consecutive,
non-overlapping windows of ``window`` tokens (the last may be shorter). Each
window is a fresh sequence; every token but the window's first is scored.
This is the method behind the fixture's published reference figure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import ConfigError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens: int
    """Tokens scored."""
    windows: int
    seconds: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of every entry per row [T, V], in float64 for stable sums."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row, in float64 for a stable sum."""
    return log_softmax(logits)[np.arange(len(targets)), targets]


def windows(tokens, window: int) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows of ``window`` tokens (the last
    may be shorter), each long enough to score a token after its first."""
    return [
        np.asarray(tokens[start : start + window])
        for start in range(0, len(tokens) - 1, window)
    ]


def perplexity(
    model,
    tokens: list[int],
    window: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``tokens`` under ``model`` (see the module docstring)."""
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}")
    if window > model.n_ctx:
        raise ConfigError(
            f"window of {window} tokens exceeds the model context {model.n_ctx}"
        )
    if len(tokens) < 2:
        raise ConfigError("the text has fewer than 2 tokens; nothing to score")
    t0 = time.perf_counter()
    total, count = 0.0, 0
    chunks = windows(tokens, window)
    for i, chunk in enumerate(chunks):
        logits = model.logits(chunk)  # [W, V]
        total -= float(log_softmax_at(logits[:-1], chunk[1:]).sum())
        count += len(chunk) - 1
        if progress:
            progress(i + 1, len(chunks))
    nll = total / count
    return PerplexityResult(
        math.exp(nll), nll, count, len(chunks), time.perf_counter() - t0
    )
