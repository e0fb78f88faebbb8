"""Routed experts of a converted model: dual routing, HEBF loading, waves.

Per MoE layer: dual routing picks each chosen expert's level per token; an
expert whose wanted planes are not all in memory but whose lower planes are
runs at that resident level rather than wait (the upgrade is fetched in the
background for next time). Missing planes are queued hottest-expert,
most-significant-plane first; experts run in waves as soon as their planes
are in, overlapping compute with the reads still in flight. Before the wait,
the next MoE layer's router is applied to this layer's input to prefetch
that layer's likely experts at their first plane (HOBBIT's predictor).
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.runtime.dual_routing import LevelPolicy
from edgemoe.runtime.expert_cache import PlaneCache
from edgemoe.runtime.forward import (
    ExpertPlanes,
    Forward,
    LayerWeights,
    Workspace,
    prefix,
)


class CachedRouted:
    def __init__(
        self,
        cache: PlaneCache,
        policy: LevelPolicy,
        routers: dict,
        shifts,
        prefetch: bool = True,
        pipeline: str = "waves",
    ):
        self.cache = cache
        self.policy = policy
        self.routers = routers  # layer -> float32 router [E, D], for prediction
        self.next_moe = {a: b for a, b in zip(cache.moe_layers, cache.moe_layers[1:])}
        self.prefetch_enabled = prefetch
        self.shifts = shifts
        self.pipeline = pipeline
        """"waves" overlaps compute with loads; "sync" waits for all of a
        layer's loads first (the on-demand baseline)."""
        self.planes_run = np.zeros(len(cache.planes) + 1, dtype=np.int64)
        """How many (token, expert) pairs ran with n planes, n = 0..P."""
        self._level_bytes = np.concatenate([[0], np.cumsum(cache.plane_bytes)])
        self.bytes_computed = 0
        """Expert weight bytes the computed planes span (memory traffic)."""

    def experts_for(self, layer: int) -> ExpertPlanes:
        c = self.cache
        return ExpertPlanes(
            list(c.tensors),
            [
                tuple(self.shifts[layer][j][p] for j in range(3))
                for p in range(len(c.planes))
            ],
            [s + 1 for s in c.slots],
        )

    def run(self, fw: Forward, ws: Workspace, layer: int, w: LayerWeights) -> None:
        cache, policy = self.cache, self.policy
        ids = ws.ids.astype(np.int64)  # [T, K]
        rw = ws.rw.copy()
        want = policy.planes(layer, ids, rw)  # [T, K] planes per (token, expert)
        # Per-expert bookkeeping in plain Python: decode sees K pairs a layer,
        # where numpy's per-call cost would dominate.
        top: dict[int, int] = {}
        for e, n in zip(ids.ravel().tolist(), want.ravel().tolist()):
            top[e] = max(top.get(e, 0), n)
        cap = np.full(cache.n_expert, len(cache.planes), dtype=want.dtype)
        if policy.force_level is None:
            # Run at the resident level rather than stall on an upgrade,
            # and fetch the upgrade in the background for the next token.
            for e, target in top.items():
                have = cache.resident_planes(layer, e)
                if 0 < have < target:
                    cache.prefetch(layer, [e], planes=target)
                    cap[e] = top[e] = have
            want = np.minimum(want, cap[ids])
        if ws.t == 1 and self.prefetch_enabled:
            self._predict_next(ws, layer)
        pending = sorted(top)
        # A forced level is exact: an expert granted only some of its planes
        # (upper pools full of this layer's pinned planes) waits for a later
        # batch instead of running at fewer. Dual routing runs it at those.
        forced = policy.force_level is not None
        while pending:
            granted = cache.acquire(layer, self._heat(pending, ids, rw, want))
            batch = [e for e in pending if granted[e] >= (top[e] if forced else 1)]
            if not batch:
                if cache.pending:
                    # Every free plane-1 slot is taken by reads in flight
                    # (prefetches, upgrades), which cannot be evicted while
                    # the I/O threads write them: once done they can be.
                    cache.poll()
                    cache.wait()
                    continue
                raise RuntimeError("expert cache has no free slot for plane 1")
            for e in batch:
                cap[e] = top[e] = min(top[e], granted[e])
            want = np.minimum(want, cap[ids])
            self._waves(fw, ws, layer, ids, rw, want, batch, top)
            cache.release(layer, granted)
            pending = [e for e in pending if e not in batch]
        ws.rw[...] = rw
        runs = np.bincount(want.ravel(), minlength=len(self.planes_run))
        self.planes_run += runs
        self.bytes_computed += int(runs @ self._level_bytes)

    @staticmethod
    def _heat(experts, ids, rw, want) -> dict[int, list[float]]:
        """Per expert, the routing weight that needs each of its planes."""
        heat: dict[int, list[float]] = {e: [] for e in experts}
        flat = zip(ids.ravel().tolist(), rw.ravel().tolist(), want.ravel().tolist())
        for e, w, n in flat:
            h = heat.get(e)
            if h is None:
                continue
            h.extend([0.0] * (n - len(h)))
            for p in range(n):
                h[p] += w
        return {e: [x + 1e-9 for x in h] for e, h in heat.items()}

    def _waves(self, fw, ws, layer, ids, rw, want, batch, top) -> None:
        cache = self.cache
        remaining = set(batch)
        if self.pipeline == "sync":
            while any(cache.resident_planes(layer, e) < top[e] for e in batch):
                cache.poll()
                cache.wait()
        while remaining:
            cache.poll()
            ready = [e for e in remaining if cache.resident_planes(layer, e) >= top[e]]
            if not ready:
                cache.wait()
                continue
            stage = self._stage(ws, layer, ids, rw, want, ready)
            if cache.tracing:
                cache.counters.trace.append(
                    ("compute", (layer, tuple(ready)), time.perf_counter())
                )
            fw.stage(ws, layer, stage)
            ws.x += ws.eout
            remaining -= set(ready)

    def _stage(self, ws, layer, ids, rw, want, ready) -> str:
        """Fill the workspace for one wave (the ``ready`` experts) and name
        its E graph: each token's running experts ordered by planes, most
        first, so plane p runs on a prefix of counts[p] of them."""
        cache = self.cache
        t = ids.shape[0]
        if t == 1:
            return self._stage_one(ws, layer, ids[0], rw[0], want[0], ready)
        run = np.isin(ids, ready)
        planes = np.where(run, want, 0)  # [T, K]
        order = np.argsort(-planes, axis=1, kind="stable")
        planes = np.take_along_axis(planes, order, axis=1)
        experts = np.take_along_axis(ids, order, axis=1)
        weights = np.take_along_axis(np.where(run, rw, 0.0), order, axis=1)
        counts = [
            int(c) for c in (planes[:, :, None] > np.arange(planes.max())).sum(1).max(0)
        ]
        for p, kp in enumerate(counts):
            slots = np.full((t, kp), cache.zero[p], dtype=np.int32)
            use = planes[:, :kp] > p
            for e in np.unique(experts[:, :kp][use]):
                slots[use & (experts[:, :kp] == e)] = cache.slot(layer, int(e), p)
            prefix(ws.pids[p], t, kp)[...] = slots
            ws.scales[p] = [2.0 ** -self.shifts[layer][j][p] for j in range(3)]
        prefix(ws.rw, t, counts[0])[...] = weights[:, : counts[0]]
        return "X" + ",".join(map(str, counts))

    def _stage_one(self, ws, layer, ids, rw, want, ready) -> str:
        """``_stage`` for one token in plain Python: decode runs it for every
        wave of every layer, and numpy's per-call cost made it ~0.3 ms."""
        cache = self.cache
        ready = set(ready)
        rows = [
            (n if e in ready else 0, e, w if e in ready else 0.0)
            for e, w, n in zip(ids.tolist(), rw.tolist(), want.tolist())
        ]
        rows.sort(key=lambda r: -r[0])  # stable: ties keep routing order
        top = rows[0][0]
        counts = [sum(1 for n, _, _ in rows if n > p) for p in range(top)]
        for p, kp in enumerate(counts):
            prefix(ws.pids[p], 1, kp)[...] = [
                cache.slot(layer, e, p) for _, e, _ in rows[:kp]
            ]
            ws.scales[p] = [2.0 ** -self.shifts[layer][j][p] for j in range(3)]
        prefix(ws.rw, 1, counts[0])[...] = [w for _, _, w in rows[: counts[0]]]
        return "X" + ",".join(map(str, counts))

    def _predict_next(self, ws: Workspace, layer: int) -> None:
        nxt = self.next_moe.get(layer)
        router = self.routers.get(nxt)
        if router is None:
            return
        logits = ws.hn[0] @ router.T  # [E]
        k = self.cache.ckpt.spec.n_expert_used
        top = np.argpartition(-logits, k - 1)[:k]
        self.cache.prefetch(nxt, [int(e) for e in top[np.argsort(-logits[top])]])
