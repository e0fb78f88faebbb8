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


def scored_topk(
    logits: np.ndarray,
    k: int,
    kind: str,
    normalize: bool,
    select: np.ndarray | None = None,
    groups: tuple[int, int] = (0, 0),
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's routers: scores are the softmax (V2) or the sigmoid (V3) of
    ``logits`` [T, E]; experts are chosen by score plus ``select`` [E] (V3's
    correction bias), only from each token's ``groups[1]`` best of
    ``groups[0]`` groups (a group scored by its best expert for softmax, its
    best two for sigmoid); weights are the chosen scores, renormalised if
    ``normalize``, times ``scale``. ids [T, K] (int64, largest weight first)
    and weights [T, K]."""
    if kind == "softmax_topk":
        scores = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores if select is None else scores + select
    n_group, topk_group = groups
    if n_group > 1:
        t, e = choice.shape
        per = choice.reshape(t, n_group, e // n_group)
        best = 1 if kind == "softmax_topk" else 2
        score = np.sort(per, axis=-1)[..., -best:].sum(-1)  # [T, G]
        chosen = np.argsort(-score, axis=-1, kind="stable")[:, :topk_group]
        keep = np.zeros((t, n_group), dtype=bool)
        np.put_along_axis(keep, chosen, True, axis=-1)
        choice = np.where(keep[:, :, None], per, -np.inf).reshape(t, e)
    top = np.argsort(-choice, axis=-1, kind="stable")[:, :k]  # [T, K]
    weights = np.take_along_axis(scores, top, axis=-1)
    if select is not None:  # chosen with the bias, ranked by weight
        order = np.argsort(-weights, axis=-1, kind="stable")
        top = np.take_along_axis(top, order, axis=-1)
        weights = np.take_along_axis(weights, order, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return top, (weights * scale).astype(np.float32, copy=False)


def route(
    spec: ModelSpec, logits: np.ndarray, select: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The experts and weights ``spec``'s router picks for ``logits`` [T, E]
    (the router's bias already added; ``select``: DeepSeek-V3's correction
    bias)."""
    grouped = spec.n_group > 1 or select is not None or spec.routed_scale != 1.0
    if spec.router == "softmax_topk" and not grouped:
        return softmax_topk(logits, spec.n_expert_used, spec.norm_topk_prob)
    if spec.router in ("softmax_topk", "sigmoid_topk"):
        return scored_topk(
            logits, spec.n_expert_used, spec.router, spec.norm_topk_prob, select,
            (spec.n_group, spec.topk_group), spec.routed_scale,
        )  # fmt: skip
    if spec.router == "topk_softmax":
        return topk_softmax(logits, spec.n_expert_used)
    raise ConfigError(f"router kind {spec.router!r} is not implemented")
