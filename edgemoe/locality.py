"""Routing locality: how a model's expert choices repeat over a token stream.

Whether streaming experts pays depends on it: how evenly a layer uses its
experts (popularity entropy), how soon an expert is needed again (reuse
distance, in tokens) and what share of picks an LRU cache holding a fraction
of the experts would serve. Trained MoEs use their experts nearly evenly over
a long text yet reuse them within a few tokens; random-weight routers do
neither. Legend: T tokens, K experts per token, E experts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

FRACTIONS = (0.25, 0.5, 0.75)
"""Cache sizes, as fractions of a layer's experts, that the summary simulates."""


@dataclass(frozen=True)
class LayerLocality:
    """One MoE layer's routing over a token stream."""

    tokens: int
    entropy: float
    """Entropy of expert frequency over log(E): 1 when every expert is
    picked equally often, 0 when one expert takes every pick."""
    top_share: float
    """The busiest expert's share of the picks (1/E when balanced)."""
    reuse_quartiles: tuple[float, float, float]
    """25/50/75th percentiles of reuse distance in tokens (1 = the previous
    token picked it too); NaN when no expert was picked twice."""
    lru_hits: dict[float, float]
    """Per cache size (fraction of E): share of picks an LRU cache served."""


def _check(ids: np.ndarray, n_expert: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"expert ids must be an integer [T, K] array, got {ids!r}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_expert):
        raise ValueError(f"expert ids must lie in 0..{n_expert - 1}")
    return ids


def popularity_entropy(ids: np.ndarray, n_expert: int) -> float:
    """Entropy of how often each expert is picked, over log(E)."""
    ids = _check(ids, n_expert)
    if n_expert < 2 or ids.size == 0:
        return 1.0
    p = np.bincount(ids.ravel(), minlength=n_expert) / ids.size  # [E]
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(n_expert))


def reuse_distances(ids: np.ndarray) -> np.ndarray:
    """For every pick of an expert picked before: tokens since its last pick.

    First picks have no distance and are left out.
    """
    ids = np.asarray(ids)
    last: dict[int, int] = {}
    out: list[int] = []
    for t, row in enumerate(ids.tolist()):  # [K]
        for e in row:
            prev = last.get(e)
            if prev is not None and prev != t:
                out.append(t - prev)
            last[e] = t
    return np.asarray(out, dtype=np.int64)


def lru_hit_rate(ids: np.ndarray, capacity: int) -> float:
    """Share of picks an LRU cache of ``capacity`` experts already held.

    A token's experts are looked up together, then all become most recent
    (the least recent beyond capacity leave), as a layer's loads are.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    cache: OrderedDict[int, None] = OrderedDict()
    hits = picks = 0
    for row in np.asarray(ids).tolist():  # [K]
        hits += sum(1 for e in set(row) if e in cache)
        picks += len(row)
        for e in row:
            cache[e] = None
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / picks if picks else 0.0


def layer_locality(
    ids: np.ndarray, n_expert: int, fractions: tuple[float, ...] = FRACTIONS
) -> LayerLocality:
    """Summary of one layer's expert ids [T, K]."""
    ids = _check(ids, n_expert)
    counts = np.bincount(ids.ravel(), minlength=n_expert)
    d = reuse_distances(ids)
    quartiles = (
        tuple(float(q) for q in np.percentile(d, (25, 50, 75)))
        if d.size
        else (float("nan"),) * 3
    )
    return LayerLocality(
        tokens=int(ids.shape[0]),
        entropy=popularity_entropy(ids, n_expert),
        top_share=float(counts.max() / max(ids.size, 1)),
        reuse_quartiles=quartiles,  # type: ignore[arg-type]
        lru_hits={f: lru_hit_rate(ids, max(1, round(f * n_expert))) for f in fractions},
    )


def markdown(layers: list[LayerLocality], n_expert: int) -> str:
    """A table, one row per MoE layer, and a mean row."""
    fracs = sorted({f for lay in layers for f in lay.lru_hits})
    head = " | ".join(f"LRU {f:.0%}" for f in fracs)
    lines = [
        f"| layer | tokens | entropy | busiest expert (1/E = {1 / n_expert:.1%}) "
        f"| reuse distance q1 / median / q3 | {head} |",
        "|---|---|---|---|---|" + "---|" * len(fracs),
    ]

    def row(name: str, tokens, ent, top, q, hits) -> str:
        qs = " / ".join(f"{x:g}" for x in q)
        hs = " | ".join(f"{h:.1%}" for h in hits)
        return f"| {name} | {tokens} | {ent:.3f} | {top:.1%} | {qs} | {hs} |"

    for i, lay in enumerate(layers):
        lines.append(
            row(
                str(i),
                lay.tokens,
                lay.entropy,
                lay.top_share,
                lay.reuse_quartiles,
                [lay.lru_hits[f] for f in fracs],
            )
        )
    if len(layers) > 1:
        lines.append(
            row(
                "mean",
                "",
                float(np.mean([x.entropy for x in layers])),
                float(np.mean([x.top_share for x in layers])),
                np.nanmean([x.reuse_quartiles for x in layers], axis=0),
                [float(np.mean([x.lru_hits[f] for x in layers])) for f in fracs],
            )
        )
    return "\n".join(lines)
