"""Routed experts of a converted model: dual routing and HEBF loading,
between the step graphs (runtime/step.py).

With every plane resident and fixed counts per plane (a forced level or a
preset) the experts run inside the step graph (``experts_for`` gives each
layer its slots and counts). Otherwise each MoE
layer's graph stops after its router and ``place`` decides, on the host:
dual routing picks each chosen expert's level per token; an expert whose
wanted planes are not all in memory but whose lower planes are runs at that
resident level rather than wait (the upgrade is fetched in the background);
missing planes are queued hottest-expert, most-significant-plane first, and
the layer waits for them; the next MoE layer's router is applied to this
layer's input to prefetch its likely experts (HOBBIT's predictor) before
that wait. Then the slot ids go into the carry and the next graph runs.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.errors import ConfigError
from edgemoe.runtime.dual_routing import LevelPolicy
from edgemoe.runtime.layers import ExpertPlanes


class CachedRouted:
    def __init__(
        self,
        cache,
        policy: LevelPolicy,
        routers: dict,
        shifts,
        prefetch: bool = True,
        resident: bool = False,
        in_memory: bool = False,
    ):
        self.cache = cache
        self.policy = policy
        self.routers = routers
        """layer -> its router (float32 [E, D], bias [E] or 0.0), for prediction."""
        self.next_moe = {a: b for a, b in zip(cache.moe_layers, cache.moe_layers[1:])}
        self.prefetch_enabled = prefetch
        self.shifts = shifts
        self.resident = resident
        """Every plane in memory and fixed counts: the graph runs experts."""
        self.in_memory = in_memory
        """``cache`` is a ResidentPlanes (runtime/resident.py): every plane
        the policy runs is loaded, nothing to load or pin; else a PlaneCache
        (runtime/expert_cache.py) streaming planes into slots."""
        self.planes_run = np.zeros(len(cache.planes) + 1, dtype=np.int64)
        """How many (token, expert) pairs ran with n planes, n = 0..P."""
        self._level_bytes = np.concatenate([[0], np.cumsum(cache.plane_bytes)])
        self.bytes_computed = 0
        """Expert weight bytes the computed planes span (memory traffic)."""
        self._held: list[tuple[int, dict[int, int]]] = []
        self.row_policies: tuple[tuple[LevelPolicy, int], ...] | None = None
        """For one step whose sequences asked for different qualities: each
        sequence's policy and new tokens, in the step's order (host-routed)."""
        self._policies: dict[str, LevelPolicy] = {}
        self.host_for_mix = False
        """In memory, the graph was moved to host routing for a mixed step."""

    @property
    def policy(self) -> LevelPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: LevelPolicy) -> None:
        self._policy = policy
        self._rank_tally: dict[int, tuple[np.ndarray, int]] = {}
        """K -> (pairs per plane count, their bytes) of one row by rank."""
        self._protected = [frozenset(p) for p in policy.protected]

    def policy_for(self, quality, levels: tuple[int, ...]) -> LevelPolicy:
        """The policy of ``quality`` (a preset or "T1,T2") on this model, with
        its forced level and protected experts; a ConfigError if it is unknown
        or would run planes an in-memory budget did not load."""
        key = quality if isinstance(quality, str) else ",".join(map(str, quality))
        policy = self._policies.get(key)
        if policy is None:
            old = self.policy
            policy = LevelPolicy.make(old.plan, old.protected, quality, old.force_level)
            if old.force_level is not None:
                policy = old  # a forced level runs whatever the quality
            elif self.in_memory:
                used = policy.planes_used(self.cache.ckpt.spec.n_expert_used)
                if used > self.cache.n_planes:
                    raise ConfigError(
                        f"quality {quality!r} runs experts at level "
                        f"{levels[used - 1]}, but this budget loaded them up to "
                        f"level {levels[self.cache.n_planes - 1]} only; reload "
                        "with a larger budget (or a smaller one, which streams them)"
                    )
            self._policies[key] = policy
        return policy

    def _want(self, layer: int, ids: np.ndarray, rw: np.ndarray) -> np.ndarray:
        """Planes per (row, expert), [R, K]: the policy's, or each sequence's
        own when a step mixes qualities (the last layer has a row per
        sequence, the others a row per token)."""
        groups = self.row_policies
        if groups is None:
            return self.policy.planes(layer, ids, rw)
        per_token = ids.shape[0] == sum(n for _, n in groups)
        out, a = [], 0
        for policy, n in groups:
            n = n if per_token else 1
            out.append(policy.planes(layer, ids[a : a + n], rw[a : a + n]))
            a += n
        return np.concatenate(out)

    def experts_for(self, layer: int) -> ExpertPlanes:
        c, policy = self.cache, self.policy
        shifts = tuple(
            tuple(self.shifts[layer][j][p] for j in range(3))
            for p in range(len(c.planes))
        )
        if not self.resident:
            return ExpertPlanes(c.tensors_for(layer), shifts, tuple(c.slots), True)
        protected = policy.protected[layer] if layer < len(policy.protected) else ()
        return ExpertPlanes(
            c.tensors_for(layer),
            shifts,
            tuple(c.slots),
            n_expert=c.n_expert,
            counts=policy.counts(c.ckpt.spec.n_expert_used),
            protected=tuple(protected),
        )

    def count_resident(self, routes: dict[int, np.ndarray]) -> None:
        """Statistics of a step whose experts ran in the graph: per MoE layer
        its rows' experts [R, K], heaviest first. Rank r runs the planes the
        preset gives it (protected experts the top level), so a step without
        protected experts adds a per-rank tally: per-layer numpy work here
        was most of a small model's host time per token."""
        rows = 0  # pairs' rows that take the per-rank tally
        k = 0
        for layer, ids in routes.items():
            k = ids.shape[1]
            protected = self._protected[layer] if layer < len(self._protected) else ()
            if protected and not protected.isdisjoint(ids.ravel().tolist()):
                rank_weights = np.broadcast_to(np.arange(k, 0, -1), ids.shape)
                self._count(self.policy.planes(layer, ids, rank_weights))
            else:
                rows += ids.shape[0]
            self.cache.counters.hits[0] += ids.size
        if rows:
            tally = self._rank_tally.get(k)
            if tally is None:
                runs = np.bincount(
                    self.policy.rank_planes(k), minlength=len(self.planes_run)
                )
                tally = self._rank_tally[k] = (runs, int(runs @ self._level_bytes))
            self.planes_run += rows * tally[0]
            self.bytes_computed += rows * tally[1]

    # -- between graphs ------------------------------------------------------------
    def place(self, layer: int, carry, run_partial) -> tuple[int, ...]:
        """Decide layer ``layer``'s experts from the carry's in-graph top-k,
        load what is missing, fill slot ids, weights and scales; returns
        ``counts`` (experts per row running each plane). When the pools
        cannot hold every expert of the step at once (a prefill batch under
        a tight budget) the earlier batches run through ``run_partial``."""
        self.release()
        cache, policy = self.cache, self.policy
        ids = carry.ids.astype(np.int64)  # [R, K]
        rw = carry.w[..., 0].copy()  # [R, K]
        want = self._want(layer, ids, rw)  # [R, K] planes per (row, expert)
        if self.in_memory:  # every plane has its slot: levels and slot ids only
            batch = sorted(set(ids.ravel().tolist()))
            counts = self._fill(carry, layer, ids, rw, want, batch)
            cache.counters.hits[0] += len(batch)
            self._count(want)
            return counts
        # Per-expert bookkeeping in plain Python: decode sees K pairs a layer,
        # where numpy's per-call cost would dominate.
        top: dict[int, int] = {}
        upgrades: list[tuple[int, int]] = []  # (expert, planes) to fetch
        for e, n in zip(ids.ravel().tolist(), want.ravel().tolist()):
            top[e] = max(top.get(e, 0), n)
        cap = np.full(cache.n_expert, len(cache.planes), dtype=want.dtype)
        if policy.force_level is None:
            # Run at the level on hand (a prefetched plane 1 in flight is not
            # joined by a demand read of plane 2: on the routed benchmark
            # model at a 50% limit that halved the decode stall; an upgrade
            # in flight is not waited for) rather than stall, and fetch the
            # upgrade in the background while the disk is idle:
            # where reads are the bottleneck, upgrades queued behind misses
            # and prefetches were mostly evicted unused (on the routed
            # benchmark model at a 50% limit they doubled the bytes read
            # per token for a tenth more level-4 runs).
            for e, target in top.items():
                have = cache.level_on_hand(layer, e)
                if 0 < have < target:
                    upgrades.append((e, target))
                    cap[e] = top[e] = have
            want = np.minimum(want, cap[ids])
        pending = sorted(top)
        # A forced level is exact: an expert granted only some of its planes
        # (upper pools full of pinned planes) waits for a later batch.
        forced = policy.force_level is not None
        speculated = False
        while True:
            granted = cache.acquire(layer, self._heat(pending, ids, rw, want))
            batch = [e for e in pending if granted[e] >= (top[e] if forced else 1)]
            if not batch:
                cache.release(layer, granted)
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
            self._held.append((layer, granted))
            if not speculated:
                # After this layer's own reads are queued, so they never
                # wait behind a speculative read an I/O thread took first.
                self._speculate(carry, layer, upgrades)
                speculated = True
            self._wait(layer, batch, top)
            counts = self._fill(carry, layer, ids, rw, want, batch)
            pending = [e for e in pending if e not in batch]
            if cache.tracing:
                cache.counters.trace.append(
                    ("compute", (layer, tuple(batch)), time.perf_counter())
                )
            if not pending:
                break
            run_partial(counts)
            self.release()
        self._count(want)
        return counts

    def _count(self, want: np.ndarray) -> None:
        runs = np.bincount(want.ravel(), minlength=len(self.planes_run))
        self.planes_run += runs
        self.bytes_computed += int(runs @ self._level_bytes)

    def release(self) -> None:
        """Unpin the planes the last computed batch used."""
        for layer, granted in self._held:
            self.cache.release(layer, granted)
        self._held.clear()

    def _wait(self, layer: int, batch: list[int], top: dict[int, int]) -> None:
        cache = self.cache
        while True:
            cache.poll()
            if all(cache.resident_planes(layer, e) >= top[e] for e in batch):
                return
            cache.wait()

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

    def _fill(self, carry, layer, ids, rw, want, batch) -> tuple[int, ...]:
        """Slot ids, weights and scales of the ``batch`` experts: each row's
        running experts ordered by planes, most first, so plane p runs on a
        prefix of counts[p] of them (experts outside the batch run none)."""
        cache = self.cache
        r = ids.shape[0]
        for p in range(len(cache.planes)):
            carry.scales[p] = [2.0 ** -self.shifts[layer][j][p] for j in range(3)]
        if r == 1:  # plain Python: numpy's per-call cost dominates one row
            inb = set(batch)
            rows = [
                (n if e in inb else 0, e, w if e in inb else 0.0)
                for e, w, n in zip(ids[0].tolist(), rw[0].tolist(), want[0].tolist())
            ]
            rows.sort(key=lambda x: -x[0])  # stable: ties keep routing order
            counts = [sum(1 for n, _, _ in rows if n > p) for p in range(rows[0][0])]
            for p, kp in enumerate(counts):
                carry.pids[p].reshape(-1)[:kp] = [
                    cache.slot(layer, e, p) for _, e, _ in rows[:kp]
                ]
            carry.rw.reshape(-1)[: counts[0]] = [w for _, _, w in rows[: counts[0]]]
            carry.eids.reshape(-1)[: counts[0]] = [e for _, e, _ in rows[: counts[0]]]
            return tuple(counts)
        run = np.isin(ids, batch)
        planes = np.where(run, want, 0)  # [R, K]
        order = np.argsort(-planes, axis=1, kind="stable")
        planes = np.take_along_axis(planes, order, axis=1)
        experts = np.take_along_axis(ids, order, axis=1)
        weights = np.take_along_axis(np.where(run, rw, 0.0), order, axis=1)
        counts = [
            int(c) for c in (planes[:, :, None] > np.arange(planes.max())).sum(1).max(0)
        ]
        for p, kp in enumerate(counts):
            slots = np.full((r, kp), cache.zero[p], dtype=np.int32)
            use = planes[:, :kp] > p
            for e in np.unique(experts[:, :kp][use]):
                slots[use & (experts[:, :kp] == e)] = cache.slot(layer, int(e), p)
            carry.pids[p].reshape(-1)[: r * kp] = slots.ravel()
        carry.rw.reshape(-1)[: r * counts[0]] = weights[:, : counts[0]].ravel()
        carry.eids.reshape(-1)[: r * counts[0]] = experts[:, : counts[0]].ravel()
        return tuple(counts)

    def _speculate(self, carry, layer: int, upgrades) -> None:
        """Reads this step may not need: an upgrade only while the disk is
        idle, then the next MoE layer's predicted experts."""
        cache = self.cache
        if upgrades and not cache.pending:  # one, the heaviest expert's
            e, target = upgrades[0]
            cache.prefetch(layer, [e], planes=target)
        if carry.rows == 1 and self.prefetch_enabled:
            self._predict_next(carry, layer)

    def _predict_next(self, carry, layer: int) -> None:
        nxt = self.next_moe.get(layer)
        router = self.routers.get(nxt)
        if router is None or self.cache.first_planes[nxt] >= self.cache.n_expert:
            # Every expert of that layer has plane 1: a guess would read
            # nothing, and computing it costs host time every layer.
            return
        logits = carry.hn[0] @ router[0].T + router[1]  # [E]
        k = self.cache.ckpt.spec.n_expert_used
        top = np.argpartition(-logits, k - 1)[:k]
        self.cache.prefetch(nxt, [int(e) for e in top[np.argsort(-logits[top])]])
