"""Dual routing: the model's router picks the experts; this picks each chosen
expert's level (how many planes) per token, without training.

The presets rank a token's experts by routing weight and run plane p on the
first ceil(share_p x K) of them: "balanced" (the default) runs the top half
at level 4 and the rest at level 2. Fixed counts per plane keep the shapes
of the step graph fixed, so a model in memory routes and computes every
level inside one graph (runtime/step.py). Custom thresholds (T1, T2) use
HOBBIT's rule instead: sort by weight, give each expert the sum of the
weights ranked above it (its "unimportance"); at most T1 runs at the top
level, at most T2 one level lower, else at the lowest; the top expert always
at the top. That rule adapts per token and is decided on the host, between
graphs. Protected (super) experts always run at the top level. A forced
level overrides all of it (evaluation, lossless runs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import ConfigError
from edgemoe.quant.types import NestedQuant

QUALITY = {
    # Share of a token's K experts (by weight rank) running plane 1, 2, 3 ...
    # (the last share repeats for further planes).
    "max": (1.0, 1.0, 1.0),  # every expert at the top level
    "high": (1.0, 1.0, 0.5),  # top half at the top level, the rest one below
    "balanced": (1.0, 0.5, 0.0),  # top half at plane 2 (level 4), rest plane 1
    "fast": (1.0, 0.25, 0.0),
    "min": (1.0, 0.0, 0.0),  # every expert at the lowest level
}


@dataclass(frozen=True)
class LevelPolicy:
    plan: NestedQuant
    protected: tuple[tuple[int, ...], ...] = ()
    thresholds: tuple[float, float] | None = None
    """HOBBIT's (T1, T2); None with ``shares``."""
    force_level: int | None = None
    shares: tuple[float, ...] | None = QUALITY["balanced"]
    """A preset's share of experts per plane, by rank."""

    @classmethod
    def make(cls, plan, protected, quality="balanced", force_level=None) -> LevelPolicy:
        """``quality``: a preset name, (T1, T2), or "T1,T2" as users type it."""
        if isinstance(quality, str) and "," in quality:
            quality = quality.split(",")
        if isinstance(quality, str):
            if quality not in QUALITY:
                raise ConfigError(
                    f"quality must be one of {', '.join(QUALITY)} or (T1, T2), "
                    f"got {quality!r}"
                )
            shares, thresholds = QUALITY[quality], None
        else:
            shares = None
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
        return cls(plan, tuple(protected), thresholds, force_level, shares)

    def counts(self, k: int) -> tuple[int, ...] | None:
        """Experts per token (by rank) running each plane, when that is fixed
        (a forced level or a preset), for the step graph; else None."""
        top = self.top
        if self.force_level is not None:
            n = self.plan.n_planes(self.force_level)
            return tuple(k if p < n else 0 for p in range(top))
        if self.shares is None:
            return None
        shares = [self.shares[min(p, len(self.shares) - 1)] for p in range(top)]
        out = [k] + [math.ceil(s * k - 1e-9) for s in shares[1:]]
        return tuple(min(c, out[i - 1]) if i else c for i, c in enumerate(out))

    def rank_planes(self, k: int) -> tuple[int, ...] | None:
        """Planes the expert of each rank (0 = largest weight) runs, [K],
        when counts are fixed (a preset or forced level); else None.
        Memoized per k in the instance dict (the policy is frozen; asked
        once per MoE layer per step)."""
        memo = self.__dict__.setdefault("_ranks", {})
        if k not in memo:
            counts = self.counts(k)
            # Rank r runs the planes whose count exceeds r.
            memo[k] = (
                None
                if counts is None
                else tuple(sum(1 for c in counts if c > r) for r in range(k))
            )
        return memo[k]

    def planes_used(self, k: int) -> int:
        """How many planes, from the first, this policy can ever run."""
        counts = self.counts(k)
        if counts is None or any(self.protected):
            return self.top
        return sum(1 for c in counts if c)

    @functools.cached_property
    def top(self) -> int:
        return len(self.plan.planes)

    def planes(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Planes each (token, chosen expert) runs with; ``ids``/``weights`` [T, K]."""
        top = self.top
        per_rank = self.rank_planes(ids.shape[1])
        if per_rank is not None and ids.shape[0] == 1:
            # Decode asks once per MoE layer: plain Python beats numpy's
            # per-call cost on K values.
            w = weights[0].tolist()
            order = sorted(range(len(w)), key=lambda j: -w[j])  # stable
            row = [0] * len(w)
            for rank, j in enumerate(order):
                row[j] = per_rank[rank]
            out = np.array([row], dtype=np.int64)
        elif per_rank is not None:
            order = np.argsort(-weights, axis=1, kind="stable")
            out = np.empty(ids.shape, dtype=np.int64)
            np.put_along_axis(out, order, np.broadcast_to(per_rank, ids.shape), 1)
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
