"""Dual routing: the model's router picks the experts; this picks each chosen
expert's level (how many planes) per token, without training.

HOBBIT's rule: sort a token's experts by routing weight and give each the sum
of the weights ranked above it (its "unimportance"). The top expert scores 0
and always runs at the top level; an expert whose unimportance is at most T1
runs at the top level, at most T2 one level lower, else at the lowest level.
Protected (super) experts always run at the top level. A forced level
overrides all of it (evaluation, lossless runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.errors import ConfigError
from edgemoe.quant.types import NestedQuant

QUALITY = {
    "max": (2.0, 2.0),  # everything at the top level
    "high": (0.8, 0.95),
    "balanced": (0.6, 0.9),  # HOBBIT's Mixtral thresholds
    "fast": (0.3, 0.6),
    "min": (-1.0, -1.0),  # only the top-ranked expert at the top level
}


@dataclass(frozen=True)
class LevelPolicy:
    plan: NestedQuant
    protected: tuple[tuple[int, ...], ...] = ()
    thresholds: tuple[float, float] = QUALITY["balanced"]
    force_level: int | None = None

    @classmethod
    def make(cls, plan, protected, quality="balanced", force_level=None) -> LevelPolicy:
        if isinstance(quality, str):
            if quality not in QUALITY:
                raise ConfigError(
                    f"quality must be one of {', '.join(QUALITY)} or (T1, T2), "
                    f"got {quality!r}"
                )
            thresholds = QUALITY[quality]
        else:
            try:
                t1, t2 = (float(q) for q in quality)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"quality thresholds must be (T1, T2), got {quality!r}"
                ) from None
            if t1 > t2:
                raise ConfigError(f"quality thresholds need T1 <= T2, got {quality!r}")
            thresholds = (t1, t2)
        if force_level is not None:
            plan.n_planes(force_level)  # a clear error for an unknown level
        return cls(plan, tuple(protected), thresholds, force_level)

    @property
    def top(self) -> int:
        return len(self.plan.planes)

    def planes(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Planes each (token, chosen expert) runs with; ``ids``/``weights`` [T, K]."""
        top = self.top
        if self.force_level is not None:
            n = self.plan.n_planes(self.force_level)
            out = np.full(ids.shape, n, dtype=np.int64)
        elif ids.shape[0] == 1:
            # Decode asks once per layer per token, where numpy's per-call
            # cost (~0.1 ms here) was most of the policy's time.
            out = np.array([self._ranked_one(weights[0].tolist())], dtype=np.int64)
        else:
            t1, t2 = self.thresholds
            # float64, sorted first, summed in order: the same operations as
            # _ranked_one, so both give the same levels at a threshold.
            w = weights.astype(np.float64)
            order = np.argsort(-w, axis=1, kind="stable")
            ranked = np.take_along_axis(w, order, axis=1)
            cum = np.cumsum(ranked, axis=1)
            total = np.maximum(cum[:, -1:], 1e-30)
            before = (cum - ranked) / total  # unimportance, [T, K]
            lvl = np.where(
                before <= t1 + 1e-9,
                top,
                np.where(before <= t2 + 1e-9, max(1, top - 1), 1),
            )
            lvl[:, 0] = top  # the top-ranked expert never drops
            out = np.empty_like(lvl)
            np.put_along_axis(out, order, lvl, axis=1)
        if self.protected and layer < len(self.protected) and self.protected[layer]:
            out[np.isin(ids, self.protected[layer])] = top
        return out

    def _ranked_one(self, weights: list[float]) -> list[int]:
        """One token's levels by HOBBIT's rule, in plain Python."""
        top, (t1, t2) = self.top, self.thresholds
        order = sorted(range(len(weights)), key=lambda j: -weights[j])  # stable
        total = max(sum(weights[j] for j in order), 1e-30)  # in order, as cumsum
        out = [0] * len(weights)
        cum = 0.0
        for rank, j in enumerate(order):
            cum += weights[j]
            before = (cum - weights[j]) / total  # as numpy: (cumsum - w) / total
            if rank == 0 or before <= t1 + 1e-9:
                out[j] = top
            elif before <= t2 + 1e-9:
                out[j] = max(1, top - 1)
            else:
                out[j] = 1
        return out
