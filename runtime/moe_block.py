"""The routed-expert block of a step graph: each expert a sum of planes.

``in_graph``: experts chosen by the graph's own top-k, plane p over each
token's ``counts[p]`` heaviest experts (views of the layer's slots), plus
protected experts through a table to the zero slot. ``host_placed``: slot ids,
weights and plane scales the host filled between graphs (runtime/routed.py).
Legend: D hidden, F expert FFN, N a projection's rows, K experts per token,
R rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.checkpoint.base import aligned_empty
from edgemoe.runtime.device import T
from edgemoe.runtime.graph import Graph
from edgemoe.runtime.layers import ExpertPlanes


@dataclass(frozen=True)
class ExpertMath:
    """What an expert computes beyond its planes' products."""

    bias: tuple[T, T, T] | None = None
    """gate [F, E], up [F, E], down [D, E]: each projection's bias, added by
    expert id to the sum over planes."""
    oai: tuple[float, float] | None = None
    """gpt-oss's clamped SwiGLU (alpha, limit); None: plain SwiGLU."""

    def ffn(self, g: Graph, project, x: T, eids: T | None) -> T:
        """down(act(gate(x), up(x))) [D, K, R] with the biases, ``project(j,
        x)`` the sum over planes of projection j, ``eids`` [K, R] expert ids."""

        def proj(j: int, y: T) -> T:
            out = project(j, y)
            return out if self.bias is None else g.add_id(out, self.bias[j], eids)

        return proj(2, g.swiglu(proj(0, x), proj(1, x), self.oai))  # [F, K, R] inside


def in_graph(
    g: Graph, hn: T, ids: T, weights: T, ep: ExpertPlanes, table, math: ExpertMath
) -> T:
    """Routed experts chosen in-graph: hn [D, R], ids [K, R] (heaviest
    first) -> [D, R]. Plane p runs on each row's ``ep.counts[p]`` first
    experts; protected experts run it on the other rows too, through a
    table that sends every other expert to the zero slot."""
    d, r, k = hn.ne[0], hn.ne[1], ids.ne[0]
    counts = ep.counts or (k,)
    runs = []  # (plane, first rank, ids, tensors)
    for p, c in enumerate(counts):
        if c:
            # The layer's own [E + 1] tensors: ids index them directly.
            runs.append((p, 0, ids if c == k else g.id_rows(ids, 0, c), ep.tensors[p]))
        if ep.protected and c < k:
            rest = ids if c == 0 else g.id_rows(ids, c, k - c)
            slots = g.lookup(g.input(table), rest, ep.n_slots[p] + 1)
            runs.append((p, c, slots, ep.tensors[p]))
    x3 = _widen(g, g.reshape(hn, d, 1, r), ep)  # [Ds, 1, R]

    def project(j: int, x: T) -> T:  # sum over the planes, [N, K, R]
        acc = None
        for p, start, pid, tensors in runs:
            n = pid.ne[0]
            # The rows of these ranks (x [D, 1, R] broadcasts to any).
            xin = x if x.ne[1] == 1 or n == k else g.view_rows(x, start, n)
            y = g.mul_mat_id(tensors[j], xin, pid)
            if ep.shifts[p][j]:
                y = g.scale(y, 2.0 ** -ep.shifts[p][j])
            if acc is None and n == k:
                acc = y
            elif acc is None:
                raise AssertionError("plane 1 runs on every expert")
            else:
                acc = g.add(acc, y) if n == k else g.acc_rows(acc, y, start)
        return acc

    y = math.ffn(g, project, x3, ids)  # [Ds, K, R]
    return sum_k(g, g.mul(y, weights), d, k, r)


def _widen(g: Graph, x3: T, ep: ExpertPlanes) -> T:
    """x3 [D, 1, R] padded with zeros to the experts' stored width Ds (the
    hidden size up to whole quant blocks, gpt-oss's 2,880 -> 3,072)."""
    stored = ep.tensors[0][0].ne[0]
    return x3 if stored == x3.ne[0] else g.pad(x3, stored - x3.ne[0])


def protect_table(ep: ExpertPlanes) -> np.ndarray:
    """Expert -> its slot if protected, else the zero slot (I32 [E])."""
    table = aligned_empty((ep.n_experts,), np.int32)
    table[:] = ep.n_slots[-1]
    for e in ep.protected:
        table[e] = e
    return table


def host_placed(g: Graph, c, ep: ExpertPlanes, counts, math: ExpertMath) -> T:
    """Experts placed by the host: ``counts[p]`` per row run plane p, the
    first ones of ``c.pids[p]`` (each row's experts ordered by planes,
    most first; their expert ids in ``c.eids``), plane scales from
    ``c.scales``."""
    d, r, k = c.hn.shape[1], c.rows, counts[0]
    hn = g.input(c.hn)
    x3 = _widen(g, g.reshape(hn, d, 1, r), ep)  # [Ds, 1, R]
    rw = g.reshape(g.input(_prefix(c.rw, r, k), c.rw), 1, k, r)  # [1, K, R]
    ids = [
        g.ids(_prefix(c.pids[p], r, kp), ep.n_slots[p] + 1, c.pids)
        for p, kp in enumerate(counts)
    ]
    scales = [
        [g.input(c.scales[p, j : j + 1], c.scales) for j in range(3)]
        for p in range(len(counts))
    ]

    def project(j: int, x: T) -> T:
        acc = None
        for p, kp in enumerate(counts):
            xin = x if x.ne[1] == 1 or kp == k else g.view_rows(x, 0, kp)
            y = g.mul(g.mul_mat_id(ep.tensors[p][j], xin, ids[p]), scales[p][j])
            if acc is None:
                acc = y
            else:
                acc = g.add(acc, y) if kp == k else g.acc_rows(acc, y, 0)
        return acc

    eids = None
    if math.bias is not None:
        n_expert = math.bias[0].ne[1]  # [F, E]: the layer's experts, not slots
        eids = g.ids(_prefix(c.eids, r, k), n_expert, c.eids)
    y = math.ffn(g, project, x3, eids)  # [Ds, K, R]
    return sum_k(g, g.mul(y, rw), d, k, r)


def sum_k(g: Graph, y: T, d: int, k: int, r: int) -> T:
    """y [Ds, K, R] summed over K -> [D, R]: the first d of each row (Ds >=
    d: rows padded past the hidden size are dropped)."""
    ds = y.ne[0]
    out = g.view_2d(y, d, r, ds * k * 4, 0)
    for j in range(1, k):
        out = g.add(g.view_2d(y, d, r, ds * k * 4, j * ds * 4), out)
    if k == 1:  # a view is no output and no residual operand: copy it
        out = g.cont(out)
    return out


def _prefix(a: np.ndarray, t: int, k: int) -> np.ndarray:
    """The start of ``a`` [T, K] as a contiguous [t, k] view."""
    return a.reshape(-1)[: t * k].reshape(t, k)
