"""What the routed-expert machinery computes and keeps, checked against
computations that share none of its code: dual routing's layer outputs
against numpy at the levels it chose, and the plane-1 eviction invariant on
states written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from test_budget_floor import reported_minimum
from test_step import host_routed

import edgemoe
from edgemoe.converters.level_view import LevelCheckpoint
from edgemoe.format.reader import EdgeCheckpoint
from edgemoe.runtime.expert_cache import READY

# -- dual routing against an independent computation ---------------------------


def q8_k(x: np.ndarray) -> np.ndarray:
    """x as ggml's CPU matvec sees it: K-quant weights multiply activations
    quantized to Q8_K (blocks of 256: d = max/-127 of the largest-magnitude
    value, q = round-half-even(x/d) capped at 127). Written from ggml's
    reference quantizer's definition; with it the reference below matches
    ggml to ~1e-6 instead of ~1e-2."""
    return q8_k_ties(x)[0]


def q8_k_ties(x: np.ndarray, eps: float = 1e-3):
    """q8_k(x), and the roundings too close to call: where x/d lies within
    ``eps`` of a half step, ggml's float32 x (its SwiGLU, its sums) may round
    the other way, moving one value by one step. Returns (q8_k(x), ties) with
    ties a list of (index, signed step to the other rounding)."""
    x = x.astype(np.float32).reshape(-1, 256)
    peak = x[np.arange(len(x)), np.abs(x).argmax(1)]
    out = np.zeros_like(x)
    nz = peak != 0
    iscale = np.float32(-127.0) / peak[nz]
    v = iscale[:, None] * x[nz]
    q = np.minimum(127, np.rint(v))
    d = (np.float32(1.0) / iscale)[:, None]
    out[nz] = q * d
    frac = v - np.floor(v)
    near = (np.abs(frac - 0.5) < eps) & (np.abs(v) < 126.5)
    other = np.where(q > v, q - 1, q + 1)  # the rounding not taken
    rows = np.flatnonzero(nz)
    ties = [
        (int(rows[b]) * 256 + int(j), float((other[b, j] - q[b, j]) * d[b, 0]))
        for b, j in zip(*np.nonzero(near))
    ]
    return out.reshape(-1).astype(np.float64), ties


class Recorder:
    """Wraps a model's CachedRouted: per host-routed MoE layer, the experts'
    input, routing, the planes each (token, expert) pair actually ran with
    (taken where slot ids are filled) and what the layer added to the
    residual (the step graph's probe output, read at the next layer)."""

    def __init__(self, model):
        self.records: list = []
        self._open = None
        routed = model.routed
        model.step.probe = True
        self._place, self._fill = routed.place, routed._fill
        routed.place, routed._fill = self.place, self.fill

    def flush(self) -> None:
        if self._open is not None:
            layer, carry, h0, hn, ids, rw, levels = self._open
            self.records.append((layer, hn, ids, rw, levels, carry.xout - h0))
            self._open = None

    def place(self, layer, carry, run_partial):
        self.flush()
        self._levels: dict = {}
        ids, rw = carry.ids.copy(), carry.w[..., 0].copy()
        self._open = (
            layer,
            carry,
            carry.h.copy(),
            carry.hn.copy(),
            ids,
            rw,
            self._levels,
        )
        return self._place(layer, carry, run_partial)

    def fill(self, carry, layer, ids, rw, want, batch):
        for t, k in zip(*np.nonzero(np.isin(ids, list(batch)))):
            self._levels[int(t), int(k)] = int(want[t, k])
        return self._fill(carry, layer, ids, rw, want, batch)


class Reference:
    """A Mixtral expert FFN in numpy, with each level's weights rebuilt in
    float32 from the stored planes (export-gguf's reconstruction)."""

    def __init__(self, path):
        self.ckpt = EdgeCheckpoint(path)
        m = self.ckpt.manifest
        self.level_of = {m.plan.n_planes(lv): lv for lv in m.levels}
        self._w: dict = {}

    def weights(self, planes: int, layer: int):
        key = planes, layer
        if key not in self._w:
            view = LevelCheckpoint(self.ckpt, self.level_of[planes], "F32")
            self._w[key] = [
                view.load(f"blk.{layer}.ffn_{p}_exps.weight").data
                for p in ("gate", "up", "down")
            ]
        return self._w[key]

    def layer_output(self, record, planes: int | None = None) -> np.ndarray:
        """sum_k w_k expert_k(x), each pair at the planes it ran with (or all
        at ``planes``)."""
        return self.layer_output_ties(record, planes)[0]

    def layer_output_ties(self, record, planes: int | None = None):
        """layer_output, and what each too-close-to-call rounding of an
        expert's SwiGLU output would add to it if ggml rounded it the other
        way (a list of arrays shaped like the output)."""
        layer, hn, ids, rw, levels, _ = record
        out = np.zeros(hn.shape, dtype=np.float64)
        ties = []
        for (t, k), n in levels.items():
            gate, up, down = self.weights(planes or n, layer)
            e, x = int(ids[t, k]), q8_k(hn[t])
            a, b = gate[e] @ x, up[e] @ x
            h = (a / (1 + np.exp(-a)) * b).astype(np.float32)  # SwiGLU
            hq, near = q8_k_ties(h)
            out[t] += rw[t, k] * (down[e] @ hq)
            for j, step in near:
                flip = np.zeros(hn.shape, dtype=np.float64)
                flip[t] = rw[t, k] * step * down[e][:, j]
                ties.append(flip)
        return out, ties


def explained(actual: np.ndarray, ref: np.ndarray, ties: list) -> float:
    """rel(actual, ref) once the reference takes, of its too-close-to-call
    roundings, the ones ggml's output shows (a least-squares fit over the
    ties, each taken whole or not at all)."""
    if not ties:
        return rel(actual, ref)
    basis = np.stack([f.reshape(-1) for f in ties], axis=1)  # [out, ties]
    c = np.linalg.lstsq(basis, (actual - ref).reshape(-1), rcond=None)[0]
    taken = np.clip(np.rint(c), 0, 1)
    if np.abs(c - taken).max() > 0.1:  # not whole flips: not rounding
        return rel(actual, ref)
    return rel(actual, ref + (basis @ taken).reshape(ref.shape))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("budget", [None, 2 << 20])
def test_dual_routing_computes_the_levels_it_chose(converted_fixture, budget):
    """Every MoE layer's output, prefill and decode, equals numpy's at the
    planes each pair ran with; the same pairs all at the top level differ
    (so the check can tell levels apart). Under a budget pairs also run
    capped at what is resident."""
    opts = dict(n_ctx=128, n_threads=1)
    if budget:
        opts["budget"] = reported_minimum(converted_fixture, **opts) + budget
    ref = Reference(converted_fixture)
    with edgemoe.load(converted_fixture, **opts) as m:
        if not budget:  # in memory the preset runs in the graph; the host
            host_routed(m)  # path computes the same (tests/test_step.py)
        rec = Recorder(m)
        out = m.generate("def fib(n):", max_tokens=12, ignore_eos=True, temperature=0)
        assert len(list(out)) == 12
        rec.flush()
    top = len(ref.level_of)
    mixed = [r for r in rec.records if set(r[4].values()) - {top}]
    assert len(rec.records) == 12 * len(ref.ckpt.manifest.moe_layers)
    assert len(mixed) >= len(rec.records) // 4  # dual routing chose lower levels
    assert any(r[1].shape[0] > 1 for r in rec.records)  # prefill was checked too
    for r in rec.records:  # exact, up to roundings too close to call
        assert explained(r[5], *ref.layer_output_ties(r)) < 1e-5, (r[0], r[4])
    wrong = [rel(r[5], ref.layer_output(r, planes=top)) for r in mixed]
    assert np.median(wrong) > 1e-3


# -- the plane-1 invariant -------------------------------------------------------


def settle(cache) -> None:
    while cache.pending:
        cache.poll()
        cache.wait(0.05)
    cache.poll()


def use(cache, layer: int, expert: int, planes: int) -> None:
    granted = cache.acquire(layer, {expert: [1.0] * planes})
    assert granted == {expert: planes}
    cache.release(layer, granted)


def resident(cache, layer: int, expert: int) -> list[int]:
    """Planes of (layer, expert) that hold a slot, loading or ready."""
    return [p for p in range(len(cache.planes)) if (layer, expert, p) in cache.where]


def orphans(cache) -> list[tuple[int, int, int]]:
    return [
        (layer, e, p)
        for (layer, e, p), s in cache.where.items()
        if p and cache.state[p][s] == READY and (layer, e, 0) not in cache.where
    ]


@pytest.fixture
def small_cache(converted_fixture):
    """Two slots per plane pool, least-recently-used eviction, no prefetch, and
    reads held 0.3 s (emulated storage) so some are still in flight when a
    plane 1 is evicted."""
    opts = dict(n_ctx=128, n_threads=1, force_level=8)
    budget = reported_minimum(converted_fixture, **opts)
    with edgemoe.load(
        converted_fixture, budget=budget, eviction="lru", prefetch=False,
        throttle=(1e9, 0.3), **opts,
    ) as m:  # fmt: skip
        cache = m.routed.cache
        assert cache.slots == (2, 2, 2)
        yield cache


def test_evicting_plane_1_drops_the_planes_above_it(small_cache):
    c = small_cache
    use(c, 0, 1, planes=3)  # expert 1: all three planes
    use(c, 0, 2, planes=1)  # expert 2: plane 1 only; plane-1 pool now full
    settle(c)
    assert resident(c, 0, 1) == [0, 1, 2]
    use(c, 0, 3, planes=1)  # evicts expert 1's plane 1 (least recently used)
    assert resident(c, 0, 1) == []  # and with it its planes 2 and 3
    assert [int((s == READY).sum()) for s in c.state[1:]] == [0, 0]
    settle(c)
    assert orphans(c) == []


def test_planes_still_loading_are_dropped_when_they_land(small_cache):
    """An upgrade in flight when plane 1 goes cannot be freed at once (the
    I/O thread is writing its slot); it must be dropped when it lands, not
    left holding a slot no token can use."""
    c = small_cache
    use(c, 0, 1, planes=1)
    use(c, 0, 2, planes=1)
    settle(c)
    c.prefetch(0, [1], planes=3)  # expert 1's planes 2 and 3, in flight
    assert resident(c, 0, 1) == [0, 1, 2]
    use(c, 0, 3, planes=1)  # evicts expert 1's plane 1 while they load
    settle(c)
    assert orphans(c) == []
    assert resident(c, 0, 1) == []
    assert [int((s == READY).sum()) for s in c.state[1:]] == [0, 0]


def test_level_on_hand_counts_a_plane_1_in_flight_but_not_an_upgrade(small_cache):
    """Dual routing runs an expert at the level it has on hand: a plane 1
    still being read counts (the layer waits for it anyway, and must not add
    a demand read of plane 2 to that wait); an upgrade still being read does
    not (it is never waited for)."""
    c = small_cache
    assert c.level_on_hand(0, 1) == 0
    c.prefetch(0, [1])  # plane 1, in flight (reads take 0.3 s here)
    assert c.resident_planes(0, 1) == 0 and c.level_on_hand(0, 1) == 1
    settle(c)
    assert c.level_on_hand(0, 1) == 1
    c.prefetch(0, [1], planes=3)  # planes 2 and 3, in flight
    assert resident(c, 0, 1) == [0, 1, 2] and c.level_on_hand(0, 1) == 1
    settle(c)
    assert c.level_on_hand(0, 1) == 3


def test_a_plane_without_a_pool_is_not_counted_as_a_miss(converted_fixture):
    """At the minimum dual-routing budget the plan gives planes 2 and 3 no
    slots: wanting them is neither a miss nor an upgrade (it was counted as
    both, on every token, which halved the reported hit rate)."""
    opts = dict(n_ctx=128, n_threads=1)
    budget = reported_minimum(converted_fixture, **opts)
    with edgemoe.load(converted_fixture, budget=budget, **opts) as m:
        assert m.routed.cache.slots[1:] == (0, 0)
        out = m.generate("def fib(n):", max_tokens=20, ignore_eos=True, temperature=0)
        assert len(list(out)) == 20
        c = m.counters()
    assert c["misses"][1:] == [0, 0] and c["upgrades"] == 0, c
    assert c["misses"][0] > 0  # plane 1 streamed


def test_resident_statistics_give_each_rank_the_planes_the_policy_gives(
    converted_fixture,
):
    """A model in memory tallies the planes each (token, expert) ran by rank,
    without asking the policy per layer; the tally equals the policy's own
    per-pair levels over the logged routing, protected experts (given the top
    level) and a quality switch included."""
    import dataclasses

    with edgemoe.load(converted_fixture, n_ctx=256) as m:
        routed = m.routed
        assert routed.resident
        # Bookkeeping only: expert 3 of layer 1 counts as protected.
        routed.policy = dataclasses.replace(routed.policy, protected=((), (3,), (), ()))
        protected_pairs = 0
        for quality in ("balanced", "min"):
            if quality != "balanced":
                m.set_quality(quality)
                routed.policy = dataclasses.replace(
                    routed.policy, protected=((), (3,), (), ())
                )
            m.reset()
            m.route_log = []
            runs0, bytes0 = routed.planes_run.copy(), routed.bytes_computed
            ids = list(range(10, 40))
            m.eval(ids[:20])
            for t in ids[20:]:
                m.eval([t])
            expected = np.zeros_like(runs0)
            for step in m.route_log:
                for layer, routes in step.items():
                    k = routes.shape[1]
                    ranks = np.broadcast_to(np.arange(k, 0, -1), routes.shape)
                    want = routed.policy.planes(layer, routes, ranks)
                    expected += np.bincount(want.ravel(), minlength=len(expected))
                    if layer == 1:
                        protected_pairs += int((routes[:, 1:] == 3).sum())
            assert np.array_equal(routed.planes_run - runs0, expected), quality
            level_bytes = np.concatenate([[0], np.cumsum(routed.cache.plane_bytes)])
            assert routed.bytes_computed - bytes0 == int(expected @ level_bytes)
        assert protected_pairs > 0  # a protected expert ran below rank 0
