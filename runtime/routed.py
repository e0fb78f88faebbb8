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
from edgemoe.runtime.forward import ExpertPlanes, Forward, LayerWeights, Workspace


class CachedRouted:
    def __init__(
        self,
        cache: PlaneCache,
        policy: LevelPolicy,
        routers: dict,
        shifts,
        prefetch: bool = True,
    ):
        self.cache = cache
        self.policy = policy
        self.routers = routers  # layer -> float32 router [E, D], for prediction
        self.next_moe = {a: b for a, b in zip(cache.moe_layers, cache.moe_layers[1:])}
        self.prefetch_enabled = prefetch
        self.shifts = shifts
        self.planes_run = np.zeros(len(cache.planes) + 1, dtype=np.int64)
        """How many (token, expert) pairs ran with n planes, n = 0..P."""

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
        pending = sorted(int(e) for e in np.unique(ids))
        if policy.force_level is None:
            # Run at the resident level rather than stall on an upgrade,
            # and fetch the upgrade in the background for the next token.
            for e in pending:
                have = cache.resident_planes(layer, e)
                mask = ids == e
                target = int(want[mask].max())
                if 0 < have < target:
                    want[mask] = np.minimum(want[mask], have)
                    cache.prefetch(layer, [e], planes=target)
        if ws.t == 1 and self.prefetch_enabled:
            self._predict_next(ws, layer)
        while pending:
            heat = {e: self._heat(e, ids, rw, want) for e in pending}
            granted = cache.acquire(layer, heat)
            batch = [e for e in pending if granted[e] >= 1]
            if not batch:
                raise RuntimeError("expert cache has no free slot for plane 1")
            for e in batch:
                mask = ids == e
                want[mask] = np.minimum(want[mask], granted[e])
            self._waves(fw, ws, layer, ids, rw, want, batch)
            cache.release(layer, granted)
            pending = [e for e in pending if e not in batch]
        ws.rw[...] = rw
        for n, c in zip(*np.unique(want, return_counts=True)):
            self.planes_run[n] += c

    @staticmethod
    def _heat(e: int, ids, rw, want) -> list[float]:
        mask = ids == e
        top = int(want[mask].max())
        return [float(rw[mask][want[mask] > p].sum()) + 1e-9 for p in range(top)]

    def _waves(self, fw, ws, layer, ids, rw, want, batch) -> None:
        cache = self.cache
        remaining = set(batch)
        while remaining:
            cache.poll()
            ready = [
                e
                for e in remaining
                if cache.resident_planes(layer, e) >= int(want[ids == e].max())
            ]
            if not ready:
                cache.wait()
                continue
            run = np.isin(ids, ready)
            planes = int(want[run].max())
            for p in range(planes):
                slot = np.full(ids.shape, cache.zero[p], dtype=np.int32)
                use = run & (want > p)
                for e in ready:
                    m = use & (ids == e)
                    if m.any():
                        slot[m] = cache.slot(layer, e, p)
                ws.pids[p] = slot
            ws.rw[...] = np.where(run, rw, 0.0)
            if cache.tracing:
                cache.counters.trace.append(
                    ("compute", (layer, tuple(ready)), time.perf_counter())
                )
            fw.stage(ws, layer, f"E{planes}")
            ws.x += ws.eout
            remaining -= set(ready)

    def _predict_next(self, ws: Workspace, layer: int) -> None:
        nxt = self.next_moe.get(layer)
        router = self.routers.get(nxt)
        if router is None:
            return
        logits = ws.hn[0] @ router.T  # [E]
        k = self.cache.ckpt.spec.n_expert_used
        top = np.argpartition(-logits, k - 1)[:k]
        self.cache.prefetch(nxt, [int(e) for e in top[np.argsort(-logits[top])]])
