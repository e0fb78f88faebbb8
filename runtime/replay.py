"""Replaying the routing a converter recorded through the expert plane pools:
which planes a decode runs and which it reads, per token, for the cost model
(runtime/costmodel.py), with the runtime cache's own eviction score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.runtime.expert_cache import keep_score


def routing_trace(ckpt) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per MoE layer, (ids [S, K], weights [S, K]) of consecutive calibration
    tokens, as the converter recorded them. Models converted before it did get
    a stand-in drawn from the hotness (no locality, equal weights)."""
    m = ckpt.manifest
    k = ckpt.spec.n_expert_used
    recorded = m.calibration.get("routing") or []
    rng = np.random.default_rng(0)
    out = []
    for layer in m.moe_layers:
        rec = recorded[layer] if layer < len(recorded) else {}
        ids = np.asarray(rec.get("ids", []), dtype=np.int64)
        w = np.asarray(rec.get("weights", []), dtype=np.float64)
        if ids.ndim != 2 or ids.shape[1:] != (k,) or ids.shape != w.shape:
            freq = np.array([h.freq for h in m.hotness[layer]]) + 1e-6
            ids = np.stack(
                [rng.choice(freq.size, k, replace=False, p=freq / freq.sum())
                 for _ in range(256)]
            )  # fmt: skip
            w = np.full(ids.shape, 1.0 / k)
        out.append((ids, w))
    return out


def prefetch_trace(ckpt) -> list[np.ndarray | None]:
    """Per MoE layer, [S, K] experts the runtime's prefetch guesses for the
    next MoE layer at the traced tokens (recorded by the converter), or None
    where the manifest has none (the last layer; older conversions)."""
    recorded = ckpt.manifest.calibration.get("routing") or []
    out = []
    for layer in ckpt.manifest.moe_layers:
        rec = recorded[layer] if layer < len(recorded) else {}
        nxt = np.asarray(rec.get("next", []), dtype=np.int64)
        out.append(nxt if nxt.ndim == 2 and len(nxt) else None)
    return out


def level_mix(ckpt, policy) -> np.ndarray:
    """[L, P+1] fraction of each MoE layer's chosen experts that dual routing
    gives n planes (column n), over the routing trace."""
    top = len(ckpt.manifest.plan.planes)
    out = []
    for layer, (ids, w) in zip(ckpt.manifest.moe_layers, routing_trace(ckpt)):
        planes = policy.planes(layer, ids, w)  # [S, K]
        out.append(np.bincount(planes.reshape(-1), minlength=top + 1) / planes.size)
    return np.asarray(out)


@dataclass(frozen=True)
class Replay:
    """Per-token averages of replaying the trace through the plane pools."""

    reads: np.ndarray
    """[P] plane reads per token."""
    runs: np.ndarray
    """[P] plane computes per token (an expert runs planes 1..n)."""
    wanted: np.ndarray
    """[P] planes dual routing asked for per token."""
    prefetched: float = 0.0
    """First planes read per token on a prefetch guess (not in ``reads``)."""


def replay(
    ckpt,
    policy,
    slots: tuple[int, ...] | None,
    prefetch: bool = False,
    cold: bool = False,
) -> Replay:
    """Replay the routing trace through the plane pools as the runtime's cache
    keeps them (``expert_cache.PlaneCache``): one pool of ``slots[p]`` slots
    per plane, the same eviction score (recency, use, hotness, layers until
    the next use), the current layer's planes pinned, and losing plane 1
    drops the planes above it. An expert without plane 1 (or at a forced
    level) has its wanted planes read and waited for; one with plane 1 runs at
    its resident level while a missing upgrade is read for next time, when
    no other read is in flight once the layer's own misses are queued (one
    per layer at most; a plane 1 on its way counts as there). With
    ``prefetch``, each layer first loads the first plane of the experts the
    converter recorded as the runtime's guess for the next MoE layer.

    The trace's second half is counted. Before it, a warm cache has replayed
    the first half as decode; a ``cold`` one (``edgemoe bench`` from a fresh
    load: pools empty, a prompt, then the decode) has run the first half as
    one prefill batch per layer, which loads, hottest first, every plane a
    chosen expert's tokens want while the pool has a slot that is not the
    layer's own."""
    m = ckpt.manifest
    n_p = len(m.plan.planes)
    trace = routing_trace(ckpt)
    forced = policy.force_level is not None
    wants = [
        policy.planes(layer, ids, w) for layer, (ids, w) in zip(m.moe_layers, trace)
    ]  # [S, K] planes per (token, expert)
    n_tok = min(len(ids) for ids, _ in trace)
    guesses = prefetch_trace(ckpt) if prefetch else [None] * len(trace)
    after = dict(zip(m.moe_layers, m.moe_layers[1:]))
    reads, runs, wanted = np.zeros(n_p), np.zeros(n_p), np.zeros(n_p)
    if slots is None:
        for w in wants:
            for p in range(n_p):
                wanted[p] += (w > p).sum() / len(w)
        return Replay(reads, wanted.copy(), wanted)
    pools = _Pools(m, slots)
    half = n_tok // 2
    if cold:
        for li, layer in enumerate(m.moe_layers):
            _prefill(pools, layer, trace[li][0][:half], trace[li][1][:half], wants[li])
    else:
        # A pool with a slot for every expert never misses once warm, whatever
        # the trace's first half happened to touch.
        n_e = ckpt.spec.n_expert
        for p, s in enumerate(slots):
            if s >= len(m.moe_layers) * n_e:
                for layer in m.moe_layers:
                    for e in range(n_e):
                        pools.load(p, layer, e)
    # Warm the pools on the first half, count the second: replaying the same
    # tokens twice would find exactly what the first pass left behind.
    fetched = 0
    busy = False  # background reads the layer before left in flight
    phases = [(True, range(half, n_tok))]
    if not cold:
        phases.insert(0, (False, range(half)))
    for counted, span in phases:
        for t in span:
            for li, layer in enumerate(m.moe_layers):
                ids = trace[li][0][t].tolist()
                pools.begin(layer, ids)
                background = 0
                guess = guesses[li]
                if guess is not None and t < len(guess):
                    nxt = after[layer]
                    for e in guess[t].tolist():
                        if pools.where[0].get((nxt, e)) is None:
                            if not pools.load(0, nxt, e):
                                break
                            fetched += counted
                            background += 1
                # The runtime queues an upgrade after the layer's own reads,
                # and only if none is in flight then.
                misses = any(pools.where[0].get((layer, e)) is None for e in ids)
                upgraded = busy or misses
                for e, n in zip(ids, wants[li][t].tolist()):
                    ran = 0
                    # Without plane 1 every wanted plane is loaded and waited
                    # for; with it, an upgrade loads in the background, one
                    # per layer and only when no read is in flight.
                    wait = forced or pools.where[0].get((layer, e)) is None
                    for p in range(n):
                        hit = pools.use(p, layer, e)
                        if not hit:
                            if slots[p] == 0:
                                break
                            if not wait:
                                if upgraded:
                                    break
                                upgraded = True
                                background += 1
                            reads[p] += counted
                            pools.load(p, layer, e)
                        if ran == p and (hit or wait):
                            ran += 1
                    if counted:
                        wanted[:n] += 1
                        runs[:ran] += 1
                busy = background > 0
    n = n_tok - half
    return Replay(reads / n, runs / n, wanted / n, fetched / n)


def _prefill(pools, layer: int, ids: np.ndarray, w: np.ndarray, want) -> None:
    """One prefill batch of ``layer`` ([S, K] experts and weights, ``want``
    [>=S, K] planes) through the pools, as ``CachedRouted.place`` loads it."""
    top: dict[int, int] = {}
    heat: dict[int, float] = {}
    for e, n, x in zip(ids.ravel().tolist(), want[: len(ids)].ravel().tolist(),
                       w.ravel().tolist()):  # fmt: skip
        top[e] = max(top.get(e, 0), n)
        heat[e] = heat.get(e, 0.0) + x
    pools.begin(layer, list(top))
    for e in sorted(top, key=lambda e: -heat[e]):
        for p in range(top[e]):
            if not pools.use(p, layer, e) and not pools.load(p, layer, e):
                break


class _Pools:
    """The runtime cache's slot bookkeeping, without the bytes."""

    def __init__(self, manifest, slots: tuple[int, ...]):
        self.layers = list(manifest.moe_layers)
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.hot = {
            layer: [h.freq for h in manifest.hotness[layer]] for layer in self.layers
        }
        self.slots = slots
        self.where: list[dict[tuple[int, int], int]] = [{} for _ in slots]
        self.owner: list[list] = [[None] * s for s in slots]
        self.last = [np.zeros(s) for s in slots]
        self.uses: dict[tuple[int, int], int] = {}
        self.step = 0
        self.current = 0
        self.pinned: set[tuple[int, int]] = set()

    def begin(self, layer: int, ids: list[int]) -> None:
        self.current, self.step = layer, self.step + 1
        self.pinned = {(layer, e) for e in ids}
        for e in ids:
            self.uses[layer, e] = self.uses.get((layer, e), 0) + 1

    def use(self, p: int, layer: int, e: int) -> bool:
        slot = self.where[p].get((layer, e))
        if slot is None:
            return False
        self.last[p][slot] = self.step
        return True

    def load(self, p: int, layer: int, e: int) -> bool:
        owner = self.owner[p]
        try:
            slot = owner.index(None)
        except ValueError:
            slot = self._victim(p)
            if slot is None:
                return False
            self._free(p, slot)
        owner[slot] = (layer, e)
        self.where[p][layer, e] = slot
        self.last[p][slot] = self.step
        return True

    def _free(self, p: int, slot: int) -> None:
        key = self.owner[p][slot]
        del self.where[p][key]
        self.owner[p][slot] = None
        if p == 0:  # higher planes are useless without the first
            for q in range(1, len(self.slots)):
                s = self.where[q].get(key)
                if s is not None:
                    del self.where[q][key]
                    self.owner[q][s] = None

    def _victim(self, p: int) -> int | None:
        """The lowest-scoring unpinned slot, as ``PlaneCache._take_slot``."""
        n = max(len(self.layers), 1)
        cur = self.index.get(self.current, 0)
        best, best_score = None, np.inf
        for slot, key in enumerate(self.owner[p]):
            if key is None or key in self.pinned:
                continue
            layer, e = key
            age = (self.step - self.last[p][slot]) / n
            ahead = (self.index[layer] - cur - 1) % n
            score = keep_score(age, self.uses.get(key, 0), self.hot[layer][e], ahead, n)
            if score < best_score:
                best, best_score = slot, score
        return best
