"""Predicting decode speed of a converted model on a device profile.

Per token, the compute thread does a fixed amount of work (sampling, the
generation loop: the profile's ``token_overhead_ms``), more per layer (graphs,
attention and routing glue: ``layer_overhead_ms``) and per expert plane it
runs (``plane_overhead_ms``), streams the
backbone's matrices and the chosen experts' planes through ggml matvecs (the
profile's GB/s per type), and reads the planes it misses from storage. Which
experts run, at which level, and which planes miss comes from replaying the
routing the converter recorded (consecutive calibration tokens) through the
plane pools. Reads are charged their full time: the I/O threads share the
cores with ggml's threads, whose barriers make any delayed thread hold up the
graph, so reads hide little behind compute.

It predicts decode (``tg``) only: prefill is batched and compute-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.profile import DeviceProfile
from edgemoe.runtime.expert_cache import keep_score

MiB = 1 << 20


@dataclass(frozen=True)
class Prediction:
    """One configuration's predicted decode cost per token."""

    tokens_per_s: float
    ms_per_token: float
    fixed_ms: float
    """Runtime overhead: per token, per layer and per expert plane run."""
    backbone_ms: float
    experts_ms: float
    io_ms: float
    """Storage time per token (reads: latency + bytes / random-read rate)."""
    read_per_token: int
    """Bytes read from storage per token."""
    reads_per_token: float
    """Plane reads per token."""
    expert_bytes_per_token: float
    """Expert plane bytes computed per token."""
    plane_runs: float
    """Expert planes computed per token."""
    hit_rate: float
    """Expected plane hit rate."""
    planes_mix: tuple[float, ...]
    """Fraction of chosen experts that run with 1, 2, ... planes."""
    bound: str
    """What dominates: "compute", "storage" or "overhead"."""


def _type_rate(profile: DeviceProfile, ggml_type: str) -> float:
    """GB/s for a ggml type name; types without a figure use the nearest one."""
    t = ggml_type.lower()
    if t in profile.matmul:
        return profile.matmul[t]
    if t.startswith(("q2", "iq2", "iq1", "q3", "iq3")):
        return profile.matmul["q2_k"]
    if t.startswith(("q4", "q5", "iq4", "q6")):
        return profile.matmul["q4_k"]
    return profile.matmul["q8_0"]


def token_tensors(ckpt):
    """(name, ggml type, shape, bytes) of each stored tensor a decode token
    reads whole: every one but the embedding table, which is a row lookup
    (unless the head shares it)."""
    tied = ckpt.spec.tie_embeddings
    for name in ckpt.names():
        if name == "token_embd.weight" and not tied:
            continue
        yield (name, *ckpt.info(name)[:3])


def backbone_ms(ckpt, profile: DeviceProfile) -> float:
    """Time for the backbone matrices one token streams (``token_tensors``)."""
    ms = 0.0
    for _, ggml_type, shape, n in token_tensors(ckpt):
        if len(shape) < 2:
            continue  # norms and biases: negligible
        ms += n / (_type_rate(profile, ggml_type) * 1e9) * 1e3
    return ms


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
    ckpt, policy, slots: tuple[int, ...] | None, prefetch: bool = False
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
    converter recorded as the runtime's guess for the next MoE layer."""
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
    half = n_tok // 2
    fetched = 0
    busy = False  # background reads the layer before left in flight
    for counted, span in ((False, range(half)), (True, range(half, n_tok))):
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


PREFETCH_EXTRA = 0.10
"""Extra reads next-layer prefetch adds, for models converted before the
converter recorded the prefetch guesses: an estimate (bench_offload's cold
runs on the synthetic model read 22-42% more with prefetch; warm runs add
less, as most guesses are planes the layer asks for anyway)."""


def predict(
    ckpt,
    profile: DeviceProfile,
    policy,
    slots: tuple[int, ...] | None,
    prefetch: bool = True,
) -> Prediction:
    """Decode cost per token of ``ckpt`` on ``profile`` with dual-routing
    ``policy`` and ``slots`` expert slots per plane (None: all resident)."""
    m = ckpt.manifest
    planes = m.plan.planes
    shapes = ckpt.plane_shapes()
    plane_bytes = np.array(
        [sum(bt.row_bytes(kk) * n for n, kk in shapes.values()) for bt in planes]
    )
    plane_ms = plane_bytes / np.array(
        [_type_rate(profile, bt.name) * 1e9 for bt in planes]
    ) * 1e3  # fmt: skip
    recorded = any(g is not None for g in prefetch_trace(ckpt))
    r = replay(ckpt, policy, slots, prefetch=prefetch and recorded)
    guessed = prefetch and not recorded and slots is not None
    reads = r.reads * (1 + PREFETCH_EXTRA if guessed else 1)
    reads[0] += r.prefetched
    read_bytes = float((reads * plane_bytes).sum())
    expert_ms = float((r.runs * plane_ms).sum())
    bb_ms = backbone_ms(ckpt, profile)
    fixed_ms = (
        profile.token_overhead_ms
        + ckpt.spec.n_layer * profile.layer_overhead_ms
        + float(r.runs.sum()) * profile.plane_overhead_ms
    )
    io_ms = (
        float(reads.sum()) * profile.storage_latency_ms
        + read_bytes / (profile.storage_rand_read * 1e6) * 1e3
    )
    total = fixed_ms + bb_ms + expert_ms + io_ms
    parts = {"overhead": fixed_ms, "compute": bb_ms + expert_ms, "storage": io_ms}
    wanted = float(r.wanted.sum())
    mix = level_mix(ckpt, policy).mean(axis=0)[1:]
    return Prediction(
        tokens_per_s=1e3 / total,
        ms_per_token=total,
        fixed_ms=fixed_ms,
        backbone_ms=bb_ms,
        experts_ms=expert_ms,
        io_ms=io_ms,
        read_per_token=int(read_bytes),
        reads_per_token=float(reads.sum()),
        expert_bytes_per_token=float((r.runs * plane_bytes).sum()),
        plane_runs=float(r.runs.sum()),
        hit_rate=1.0 - float(r.reads.sum()) / wanted if wanted else 1.0,
        planes_mix=tuple(float(x) for x in mix),
        bound=max(parts, key=parts.get),
    )
