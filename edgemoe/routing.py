"""Expert routing: which experts each token uses, and with what weight.

Shared by the runtime and the converter's calibration pass, so both route
exactly alike. A router kind is a function here (``ModelSpec.router``).
"""

from __future__ import annotations

import numpy as np

from edgemoe.arch.base import ModelSpec
from edgemoe.errors import ConfigError


def softmax_topk(
    logits: np.ndarray, k: int, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts, keep the top ``k``, optionally renormalised.

    Args:
        logits: router logits [T, E].
    Returns:
        ids [T, K] (int64) and weights [T, K] (float32).
    """
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # [T, E]
    top = np.argpartition(-probs, k - 1, axis=-1)[:, :k]  # [T, K]
    weights = np.take_along_axis(probs, top, axis=-1)
    if normalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    return top, weights.astype(np.float32, copy=False)


def topk_softmax(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` logits, their softmax the weights (gpt-oss): ids [T, K]
    (int64) and weights [T, K] (float32)."""
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]  # [T, K]
    w = np.take_along_axis(logits, top, axis=-1)
    w = np.exp(w - w.max(axis=-1, keepdims=True))
    return top, (w / w.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)


def route(spec: ModelSpec, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The experts and weights ``spec``'s router picks for ``logits`` [T, E]
    (the router's bias already added)."""
    if spec.router == "softmax_topk":
        return softmax_topk(logits, spec.n_expert_used, spec.norm_topk_prob)
    if spec.router == "topk_softmax":
        return topk_softmax(logits, spec.n_expert_used)
    raise ConfigError(f"router kind {spec.router!r} is not implemented")
