"""Expert planes resident in fixed slots, under a memory budget.

Per plane p and projection one slab ``[S_p + 1, N, row_bytes]``, allocated once
and bound zero-copy as the ggml tensor that ``mul_mat_id`` indexes: memory use
is flat and known in advance. Slot ``S_p`` is all zeros, so an expert running
below plane p's level points plane p at it and gets nothing added. Slots hold
(layer, expert) planes of any layer; routing maps expert ids to slot ids.

Loads go through the I/O queue in HEBF order (the hottest expert's most
significant plane first, D2MoE's heuristic); the compute thread keeps all the
bookkeeping, the I/O threads only fill bytes. Eviction is per plane pool and
scores a slot by recency, use in this sequence, calibration hotness and how
soon its layer comes round again; losing plane 1 drops the planes above it.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edgemoe.checkpoint.base import Weight, aligned_empty
from edgemoe.format.spec import PROJS
from edgemoe.runtime.device import T, WeightSet
from edgemoe.runtime.io_queue import DEMAND, PAGE, PREFETCH, IOQueue, ReadRequest

EMPTY, LOADING, READY = 0, 1, 2


@dataclass
class CacheCounters:
    """Cumulative; the engine reports per-token differences."""

    hits: list[int]
    misses: list[int]
    upgrades: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    """Prefetched planes that a layer then used (prefetch accuracy)."""
    evictions: int = 0
    stall_s: float = 0.0
    trace: list = field(default_factory=list)
    """(event, key, time) when tracing is on: "load", "compute" ..."""


def keep_score(age, uses, hot, ahead, n: int):
    """How much a resident plane is worth keeping; the lowest is evicted.
    ``age``: layer steps since its last use over the ``n`` MoE layers;
    ``uses``: its expert's runs since the model loaded; ``hot``: its calibration
    frequency; ``ahead``: layers until its layer runs again. Scalars or
    arrays."""
    return -0.4 * age + 0.3 * np.log1p(uses) + 0.2 * hot - 0.3 * ahead / n


def hebf_order(heat: dict[int, list[float]]) -> list[tuple[int, int]]:
    """D2MoE's hottest-expert-bits-first order.

    ``heat[e][p]`` is how much demand plane p of expert e carries (its
    frequency). Each expert is a queue of its planes, most significant first;
    repeatedly the queue whose head is hottest gives up its head (ties: the
    lower expert id). That is ``heapq.merge`` of the queues, in ascending
    expert order (it breaks ties by input order), without a Python scan of
    every head per pick (this runs once per MoE layer).
    """
    queues = [[(h, e, p) for p, h in enumerate(heat[e])] for e in sorted(heat)]
    return [(e, p) for _, e, p in heapq.merge(*queues, key=lambda q: -q[0])]


class PlaneCache:
    """Which (layer, expert, plane) sits in which slot, and loading them."""

    def __init__(
        self,
        ckpt,
        weights: WeightSet,
        slots: tuple[int, ...],
        io: IOQueue,
        verify: bool = True,
        eviction: str = "score",
        store: str = "host",
    ):
        """``store``: "host" slabs the I/O threads fill in place (zero-copy on
        the CPU) or "device" tensors in the backend's buffer, written with
        ``ggml_backend_tensor_set`` from a staging array per read."""
        m = ckpt.manifest
        self.ckpt, self.manifest, self.io = ckpt, m, io
        self.weights = weights
        self.planes = m.plan.planes
        self.n_expert = ckpt.spec.n_expert
        self.moe_layers = m.moe_layers
        self._moe_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        shapes = ckpt.plane_shapes()
        self.slots = slots
        self.slabs: list[dict[str, np.ndarray]] = []
        self.tensors: list[tuple[T, T, T]] = []
        self.plane_bytes: list[int] = []
        self.store = store
        self._row = {}  # (p, proj) -> bytes of one slot
        for p, bt in enumerate(self.planes):
            slabs, tensors = {}, []
            for proj in PROJS:
                n, k = shapes[proj]
                shape = (slots[p] + 1, n, k)
                self._row[p, proj] = n * bt.row_bytes(k)
                name = f"experts.p{p}.{proj}"
                if store == "device":
                    # Slots in the backend's own buffer (a GPU's memory): a
                    # read lands in a staging array, then tensor_set at the
                    # slot's offset (poll). The zero slot is cleared there.
                    tensors.append(weights.add_device(name, bt.ggml, shape))
                    continue
                slab = aligned_empty((slots[p] + 1, n, bt.row_bytes(k)), np.uint8, PAGE)
                # Zero it all: slot S_p is the zero slot, and committing every
                # page now keeps memory flat instead of growing as slots fill.
                slab.fill(0)
                slabs[proj] = slab
                # Never repacked: reads rewrite single slots in place.
                tensors.append(
                    weights.add(Weight(name, bt.ggml, shape, slab), repack=False)
                )
            self.slabs.append(slabs)
            self.tensors.append(tuple(tensors))
            # One expert's bytes of plane p (what a read brings in).
            self.plane_bytes.append(sum(self._row[p, proj] for proj in PROJS))
        self.zero = [s for s in slots]
        self.where: dict[tuple[int, int, int], int] = {}
        self.owner = [np.full(s, -1, dtype=np.int64) for s in slots]
        self.state = [np.zeros(s, dtype=np.int8) for s in slots]
        self.last = [np.zeros(s, dtype=np.float64) for s in slots]
        self.pinned = [np.zeros(s, dtype=np.int32) for s in slots]
        self.pending: dict[tuple[int, int, int], ReadRequest] = {}
        self.first_planes = np.zeros(ckpt.spec.n_layer, dtype=np.int64)
        """Per layer, how many experts have plane 1 loaded or being read."""
        self.prefetched: set[tuple[int, int, int]] = set()
        """Planes loaded by prefetch and not used yet."""
        self.verify = verify
        """CRC-check every read, re-reads after eviction included: a shard
        changed under a running model is caught at its next read."""
        n_layer = ckpt.spec.n_layer
        self.uses = np.zeros((n_layer, self.n_expert), dtype=np.int64)
        """Times each (layer, expert) ran since the model loaded, over every
        sequence: the cache is shared by all of them (batched decode)."""
        self.hot = np.zeros((n_layer, self.n_expert))  # calibration frequency
        for layer, row in enumerate(m.hotness):
            if row:
                self.hot[layer] = [h.freq for h in row]
        self._pos = np.zeros(n_layer, dtype=np.int64)  # MoE index of a layer
        for layer, i in self._moe_index.items():
            self._pos[layer] = i
        self.step = 0
        self.current = 0
        self.counters = CacheCounters([0] * len(self.planes), [0] * len(self.planes))
        self.tracing = False
        self.eviction = eviction
        """"score" (the default) or "lru" (least recently used: a baseline)."""
        self._cv = threading.Condition()

    # -- state ---------------------------------------------------------------
    def notify(self, req: ReadRequest) -> None:
        """Called by I/O threads when a read finishes."""
        with self._cv:
            self._cv.notify_all()

    def resident_planes(self, layer: int, expert: int) -> int:
        """How many planes, from the first, are loaded and ready."""
        n = 0
        for p in range(len(self.planes)):
            slot = self.where.get((layer, expert, p))
            if slot is None or self.state[p][slot] != READY:
                break
            n += 1
        return n

    def level_on_hand(self, layer: int, expert: int) -> int:
        """Planes an expert can run with without waiting on an upgrade: its
        loaded planes from the first, or 1 while plane 1 is being read (a
        prefetch: the layer waits for it either way)."""
        return self.resident_planes(layer, expert) or int(
            (layer, expert, 0) in self.where
        )

    def tensors_for(self, layer: int) -> tuple[tuple[T, T, T], ...]:
        """Plane p's (gate, up, down) slot tensors, shared by every layer."""
        return tuple(self.tensors)

    def slot(self, layer: int, expert: int, plane: int) -> int:
        return self.where[layer, expert, plane]

    def resident_bytes(self) -> list[int]:
        """Bytes loaded per plane (READY slots)."""
        return [
            int((s == READY).sum()) * b for s, b in zip(self.state, self.plane_bytes)
        ]

    # -- loading -------------------------------------------------------------
    def poll(self) -> None:
        """Move finished reads to READY; raise the first failure."""
        failed = None
        for key, req in list(self.pending.items()):
            if not req.done.is_set():
                continue
            del self.pending[key]
            slot = self.where.get(key)
            p = key[2]
            if req.error is not None or req.cancelled:
                if slot is not None:
                    self._free(p, slot)
                failed = failed or req.error
                continue
            if slot is not None:
                if self.store == "device":
                    self._upload(p, slot, req.dest)
                self.state[p][slot] = READY
                orphan = p and (key[0], key[1], 0) not in self.where
                if orphan and not self.pinned[p][slot]:
                    # Its plane 1 was evicted while this read was in flight
                    # (an upgrade): useless alone, so dropped as it lands.
                    self._free(p, slot)
                    continue
            if self.tracing:
                self.counters.trace.append(("loaded", key, req.finished))
        if failed is not None:
            raise failed

    def _upload(self, p: int, slot: int, parts) -> None:
        """A read's bytes into slot ``slot`` of plane p's device tensors."""
        g = self.weights.device.g
        for t, proj, part in zip(self.tensors[p], PROJS, parts):
            size = self._row[p, proj]
            g.ggml_backend_tensor_set(t.ptr, part.ctypes.data, slot * size, size)

    def wait(self, timeout: float = 0.05) -> None:
        """Block until some read finishes (counted as stall time)."""
        t0 = time.perf_counter()
        with self._cv:
            if not any(r.done.is_set() for r in self.pending.values()):
                self._cv.wait(timeout)
        self.counters.stall_s += time.perf_counter() - t0

    def _free(self, p: int, slot: int) -> None:
        key = self.owner[p][slot]
        if key >= 0:
            layer, expert = divmod(int(key), self.n_expert)
            self.where.pop((layer, expert, p), None)
            self.prefetched.discard((layer, expert, p))
            if p == 0:
                self.first_planes[layer] -= 1
        self.owner[p][slot] = -1
        self.state[p][slot] = EMPTY
        self.pinned[p][slot] = 0

    def _scores(self, p: int, slots: np.ndarray) -> np.ndarray:
        """Keep-worthiness of ``slots`` in pool p; the lowest is evicted first.
        One numpy pass: scoring slot by slot in Python cost more than the
        reads it decided on (tens of microseconds per candidate)."""
        if self.eviction == "lru":
            return self.last[p][slots]
        layer, expert = np.divmod(self.owner[p][slots], self.n_expert)
        n = max(len(self.moe_layers), 1)
        age = (self.step - self.last[p][slots]) / n
        cur = self._moe_index.get(self.current, 0)
        ahead = (self._pos[layer] - cur - 1) % n  # layers until it runs again
        return keep_score(
            age, self.uses[layer, expert], self.hot[layer, expert], ahead, n
        )

    def _take_slot(self, p: int) -> int | None:
        free = np.nonzero(self.state[p] == EMPTY)[0]
        if free.size:
            return int(free[0])
        cands = np.nonzero((self.state[p] == READY) & (self.pinned[p] == 0))[0]
        if not cands.size:
            return None
        victim = int(cands[np.argmin(self._scores(p, cands))])
        layer, expert = divmod(int(self.owner[p][victim]), self.n_expert)
        self._free(p, victim)
        self.counters.evictions += 1
        if p == 0:
            # Higher planes are useless without the first: drop them too.
            for q in range(1, len(self.planes)):
                s = self.where.get((layer, expert, q))
                idle = s is not None and self.pinned[q][s] == 0
                if idle and self.state[q][s] == READY:
                    self._free(q, s)
        return victim

    def _load(self, layer: int, expert: int, p: int, priority: tuple) -> bool:
        slot = self._take_slot(p)
        if slot is None:
            return False
        key = (layer, expert, p)
        ref = self.manifest.experts[layer][expert][p]
        shard = self.ckpt.root / self.manifest.shards[ref.shard].file
        if self.store == "device":
            dest = [
                aligned_empty((self._row[p, proj],), np.uint8, PAGE) for proj in PROJS
            ]
        else:
            dest = [self.slabs[p][proj][slot] for proj in PROJS]
        req = ReadRequest(
            priority=priority,
            seq=0,
            key=key,
            path=shard,
            offset=ref.offset,
            length=ref.length,
            parts=ref.parts,
            dest=dest,
            crc32=ref.crc32 if self.verify else None,
        )
        self.where[key] = slot
        self.owner[p][slot] = layer * self.n_expert + expert
        if p == 0:
            self.first_planes[layer] += 1
        self.state[p][slot] = LOADING
        self.last[p][slot] = self.step
        self.pending[key] = self.io.submit(req)
        if self.tracing:
            self.counters.trace.append(("submit", key, time.perf_counter()))
        return True

    def acquire(self, layer: int, heat: dict[int, list[float]]) -> dict[int, int]:
        """Pin every wanted plane and queue the missing ones in HEBF order.

        ``heat[e]`` lists, per plane e needs, the demand on it. Returns, per
        expert, how many planes it can get (wanted, or fewer if the pool is
        full of pinned planes: the caller computes in batches then).
        """
        self.current = layer
        self.step += 1
        granted = {e: 0 for e in heat}
        order = hebf_order(heat)
        for rank, (e, p) in enumerate(order):
            if granted[e] < p or not self.slots[p]:
                # A lower plane could not be placed, or the plan gave this
                # plane no pool (the minimum budget): not a miss, never a read.
                continue
            key = (layer, e, p)
            slot = self.where.get(key)
            if slot is not None:
                self.counters.hits[p] += self.state[p][slot] == READY
                if key in self.prefetched:
                    self.prefetched.discard(key)
                    self.counters.prefetch_hits += 1
            else:
                self.counters.misses[p] += 1
                if p > 0:
                    self.counters.upgrades += 1
                if not self._load(layer, e, p, (DEMAND, rank)):
                    continue
                slot = self.where[key]
            self.pinned[p][slot] += 1
            self.last[p][slot] = self.step
            granted[e] = p + 1
        for e, n in granted.items():
            if n:
                self.uses[layer, e] += 1
        return granted

    def release(self, layer: int, granted: dict[int, int]) -> None:
        for e, n in granted.items():
            for p in range(n):
                slot = self.where.get((layer, e, p))
                if slot is not None and self.pinned[p][slot] > 0:
                    self.pinned[p][slot] -= 1

    def prefetch(self, layer: int, experts: list[int], planes: int = 1) -> None:
        """Start loading ``experts``' planes below ``planes`` for ``layer``, at
        prefetch priority, into free slots or ones held by unpinned planes
        (never the current layer's: those are pinned)."""
        for e in experts:
            for p in range(planes):
                key = (layer, e, p)
                if key in self.where:
                    continue
                if self._load(layer, e, p, (PREFETCH, self.io.new_seq())):
                    self.counters.prefetches += 1
                    self.prefetched.add(key)
                else:
                    return
