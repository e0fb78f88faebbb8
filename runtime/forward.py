"""The transformer forward pass: ggml graphs for the matmuls, numpy for the rest.

Each layer runs as graphs over one shared workspace of numpy arrays:
  A  x -> rmsnorm -> q, k, v
     (numpy: q/k norm, RoPE, KV cache, attention -> attn)
  B  x, attn -> h = x + Wo attn;  hn = rmsnorm(h);  router logits
     (numpy: softmax top-k routing -> ids, weights)
  C  h, hn -> x = h + dense MLP, or + shared expert (or x = h)
  E  hn, slot ids per plane, weights -> sum_k w_k expert_k(hn); x += it
E may run several times per layer ("waves"): experts whose planes are in
memory run at once while the I/O queue fetches the others
(runtime/routed.py). An E graph is keyed by how many of each token's experts
run each plane ("E8,5,2"): callers order a token's experts by planes, most
first, so plane p runs on a prefix of them and no work goes to experts that
do not run (a converted model's E graphs take the plane scales as inputs and
are shared by all layers: "X8,5,2"). Decode graphs (T = 1) are built once and re-run;
prefill graphs (T > 1) are built per chunk and share one scratch allocator,
so prefill memory does not grow with the layer count.
Legend: T tokens, D hidden, E experts, K experts per token, F expert FFN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgemoe.arch.base import ModelSpec
from edgemoe.attention import Attention
from edgemoe.checkpoint.base import GGML_F32, Weight, aligned_empty
from edgemoe.routing import route
from edgemoe.runtime.graph import Device, Graph, T, WeightSet


@dataclass
class ExpertPlanes:
    """A layer's routed experts: plane p is (gate, up, down) over stacked
    ``[slots, N, K]`` tensors, with power-of-two shifts per projection.

    A plain checkpoint is one plane of E slots (slot id = expert id). A
    converted model shares global slot slabs across layers (runtime/
    expert_cache.py); then slot ids come from the cache.
    """

    tensors: list[tuple[T, T, T]]
    shifts: list[tuple[int, int, int]]
    n_slots: list[int]


@dataclass
class LayerWeights:
    """ggml handles of one layer's matrices plus the float32 vectors numpy needs."""

    attn_norm: T
    wq: T
    wk: T
    wv: T
    wo: T
    ffn_norm: T
    bq: T | None = None
    bk: T | None = None
    bv: T | None = None
    bo: T | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    router: T | None = None
    experts: ExpertPlanes | None = None
    gate_shexp: T | None = None
    up_shexp: T | None = None
    down_shexp: T | None = None
    gate_inp_shexp: T | None = None
    gate: T | None = None
    up: T | None = None
    down: T | None = None


class Workspace:
    """The arrays one forward step of T tokens reads and writes, in one slab."""

    def __init__(self, spec: ModelSpec, t: int, n_planes: int = 1):
        d, k = spec.n_embd, max(spec.n_expert_used, 1)
        q_dim, kv_dim = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
        fields = {
            "x": ((t, d), np.float32),
            "q": ((t, q_dim), np.float32),
            "k": ((t, kv_dim), np.float32),
            "v": ((t, kv_dim), np.float32),
            "attn": ((t, q_dim), np.float32),
            "h": ((t, d), np.float32),
            "hn": ((t, d), np.float32),
            "router": ((t, max(spec.n_expert, 1)), np.float32),
            "ids": ((t, k), np.int32),
            "pids": ((n_planes, t, k), np.int32),
            "rw": ((t, k), np.float32),
            "scales": ((n_planes, 3), np.float32),
            "eout": ((t, d), np.float32),
        }
        sizes = {n: -(-int(np.prod(s)) * 4 // 64) * 64 for n, (s, _) in fields.items()}
        self.base = aligned_empty((sum(sizes.values()),), np.uint8)
        off = 0
        for name, (shape, dtype) in fields.items():
            n = int(np.prod(shape)) * 4
            setattr(self, name, self.base[off : off + n].view(dtype).reshape(shape))
            off += sizes[name]
        self.t = t


def to_f32(w: Weight) -> Weight:
    """A float32 copy of a small vector weight for numpy/ggml elementwise use."""
    if w.qtype == GGML_F32:
        return w
    out = aligned_empty(w.shape, np.float32)
    out[...] = w.to_float32()
    return Weight(w.name, GGML_F32, w.shape, out)


def prefix(a: np.ndarray, t: int, k: int) -> np.ndarray:
    """The start of workspace array ``a`` [T, K] as a contiguous [t, k] view
    (E graphs running k < K experts per token bind this)."""
    return a.reshape(-1)[: t * k].reshape(t, k)


class StaticRouted:
    """Routed experts all in memory, one plane: a single E run per layer."""

    def run(self, fw: Forward, ws: Workspace, layer: int, w: LayerWeights) -> None:
        ws.pids[0] = ws.ids
        fw.stage(ws, layer, f"E{ws.ids.shape[1]}")
        ws.x += ws.eout


class Forward:
    """Runs the layers of one model over a Workspace; owns the graphs."""

    def __init__(
        self,
        spec: ModelSpec,
        device: Device,
        layers: list[LayerWeights],
        attention: Attention,
    ):
        self.spec = spec
        self.device = device
        self.layers = layers
        self.attention = attention
        self._decode: dict[tuple[int, str], Graph] = {}
        self.compute_s = 0.0
        self.routed = StaticRouted()
        self._decode_ws: Workspace | None = None
        self._prefill_galloc = None

    # -- graph construction ---------------------------------------------------
    def _graph(self, ws: Workspace, layer: int, stage: str, galloc=None) -> Graph:
        # A/B/C need a few dozen tensors; E about 3 x 6 per plane + 2 x K + 32.
        size = (
            64
            if stage in "ABC"
            else 18 * self.n_planes + 2 * self.spec.n_expert_used + 32
        )
        g = Graph(self.device, n_tensors=size, galloc=galloc)
        w = self.layers[layer]
        eps = self.spec.rms_eps
        if stage == "A":
            x = g.input(ws.x, ws.base)
            xn = g.mul(g.rms_norm(x, eps), w.attn_norm)
            for wt, bias, out in (
                (w.wq, w.bq, ws.q),
                (w.wk, w.bk, ws.k),
                (w.wv, w.bv, ws.v),
            ):
                y = g.mul_mat(wt, xn)
                g.output(g.add(y, bias) if bias is not None else y, out, ws.base)
        elif stage == "B":
            x = g.input(ws.x, ws.base)
            attn = g.input(ws.attn, ws.base)
            o = g.mul_mat(w.wo, attn)
            if w.bo is not None:
                o = g.add(o, w.bo)
            h = g.add(x, o)
            g.output(h, ws.h, ws.base)
            hn = g.mul(g.rms_norm(h, eps), w.ffn_norm)
            g.output(hn, ws.hn, ws.base)
            if w.router is not None:
                g.output(g.mul_mat(w.router, hn), ws.router, ws.base)
        elif stage == "C":
            h = g.input(ws.h, ws.base)
            hn = g.input(ws.hn, ws.base)
            if w.experts is None:
                ffn = g.mul_mat(
                    w.down, g.swiglu(g.mul_mat(w.gate, hn), g.mul_mat(w.up, hn))
                )
            else:
                ffn = g.mul_mat(
                    w.down_shexp,
                    g.swiglu(g.mul_mat(w.gate_shexp, hn), g.mul_mat(w.up_shexp, hn)),
                )  # [D, T]
                if w.gate_inp_shexp is not None:
                    ffn = g.mul(ffn, g.sigmoid(g.mul_mat(w.gate_inp_shexp, hn)))
            g.output(g.add(h, ffn), ws.x, ws.base)
        else:  # "E8,5,2" / "X8,5,2": experts per token running each plane
            counts = tuple(int(c) for c in stage[1:].split(","))
            self._routed_graph(g, ws, w.experts, counts, stage[0] == "X")
        g.build()
        return g

    def _routed_graph(
        self, g: Graph, ws: Workspace, ep: ExpertPlanes, counts, scale_inputs: bool
    ):
        """``counts[p]`` experts per token run plane p: the first ones of
        ``ws.pids[p]`` (bound as a [T, counts[p]] prefix); ``scale_inputs``
        reads plane scales from ``ws.scales`` rather than baking them in."""
        d, t = self.spec.n_embd, ws.t
        k = counts[0]
        hn = g.input(ws.hn, ws.base)
        ids = [
            g.ids(prefix(ws.pids[p], t, kp), ep.n_slots[p], ws.base)
            for p, kp in enumerate(counts)
        ]
        rw = g.reshape(g.input(prefix(ws.rw, t, k), ws.base), 1, k, t)  # [1, K, T]
        x3 = g.reshape(hn, d, 1, t)  # [D, 1, T]
        scales = [
            [g.input(ws.scales[p, j : j + 1], ws.base) for j in range(3)]
            for p in range(len(counts) if scale_inputs else 0)
        ]

        def project(j: int, x: T) -> T:
            """Sum over the planes of projection j; [N, K, T]."""
            acc = None
            for p, kp in enumerate(counts):
                xin = x if x.ne[1] == 1 or kp == k else g.view_prefix(x, kp)
                y = g.mul_mat_id(ep.tensors[p][j], xin, ids[p])  # [N, kp, T]
                if scale_inputs:
                    y = g.mul(y, scales[p][j])
                elif ep.shifts[p][j]:
                    y = g.scale(y, 2.0 ** -ep.shifts[p][j])
                if acc is None:
                    acc = y
                else:
                    acc = g.add(acc, y) if kp == k else g.acc_prefix(acc, y)
            return acc

        act = g.swiglu(project(0, x3), project(1, x3))  # [F, K, T]
        down = g.mul(project(2, act), rw)  # [D, K, T]
        if k == 1:  # a view is no output: bind the product itself
            g.output(down, ws.eout.reshape(t, 1, d), ws.base)
            return
        out = g.view_2d(down, d, t, d * k * 4, 0)
        for j in range(1, k):
            out = g.add(g.view_2d(down, d, t, d * k * 4, j * d * 4), out)
        g.output(out, ws.eout, ws.base)

    # -- running ---------------------------------------------------------------
    @property
    def n_planes(self) -> int:
        planes = [len(w.experts.tensors) for w in self.layers if w.experts]
        return max(planes, default=1)

    def workspace(self, t: int) -> Workspace:
        return Workspace(self.spec, t, self.n_planes)

    def decode_workspace(self) -> Workspace:
        if self._decode_ws is None:
            self._decode_ws = self.workspace(1)
        return self._decode_ws

    def prefill_allocator(self) -> int:
        """The allocator prefill graphs share (built, run and freed one by one)."""
        if self._prefill_galloc is None:
            self._prefill_galloc = self.device.new_allocator()
        return self._prefill_galloc

    def stage(self, ws: Workspace, il: int, stage: str) -> None:
        """Run one graph: cached for the decode workspace, else built and freed."""
        t0 = time.perf_counter()
        if ws is self._decode_ws:
            key = (-1 if stage[0] == "X" else il, stage)  # X graphs: every layer
            g = self._decode.get(key)
            if g is None:
                g = self._decode[key] = self._graph(ws, il, stage)
            g.compute()
        else:
            g = self._graph(ws, il, stage, self.prefill_allocator())
            try:
                g.compute()
            finally:
                g.free()
        self.compute_s += time.perf_counter() - t0

    def run(self, ws: Workspace, pos: int, last_only: bool = False) -> np.ndarray:
        """All layers over ``ws.x`` (already embedded) at position ``pos``.

        Returns the final hidden states ``[T, D]``, or only the last row's
        ``[1, D]`` with ``last_only``: the last layer then finishes just that
        row after attention (its keys and values still enter the cache), as
        llama.cpp does; it saves that layer's FFN work on the other rows.
        """
        n = len(self.layers)
        for il, w in enumerate(self.layers):
            self.stage(ws, il, "A")
            self.attention(il, ws.q, ws.k, ws.v, pos, ws.attn, w.q_norm, w.k_norm)
            if last_only and il == n - 1 and ws.t > 1:
                last = self.decode_workspace()
                last.x[...] = ws.x[-1:]
                last.attn[...] = ws.attn[-1:]
                ws = last
            self.stage(ws, il, "B")
            if w.experts is None or w.gate_shexp is not None:
                self.stage(ws, il, "C")
            else:
                ws.x[...] = ws.h
            if w.experts is not None:
                ws.ids[...], ws.rw[...] = route(self.spec, ws.router)
                self.routed.run(self, ws, il, w)
        return ws.x[-1:] if last_only else ws.x

    def free(self) -> None:
        for g in self._decode.values():
            g.free()
        self._decode.clear()
        if self._prefill_galloc is not None:
            self.device.free_allocator(self._prefill_galloc)
            self._prefill_galloc = None


def build_layers(
    spec: ModelSpec, load, weights: WeightSet, base, experts=None
) -> list[LayerWeights]:
    """LayerWeights for every layer; ``load(name) -> Weight | None``;
    ``experts(layer) -> ExpertPlanes`` for models stored as planes."""
    layers = []

    def add(name: str, f32: bool = False) -> T | None:
        w = load(name)
        if w is None:
            return None
        if f32:
            w = to_f32(w)
        return weights.add(w, base(w))

    def vec(name: str) -> np.ndarray | None:
        w = load(name)
        return None if w is None else to_f32(w).data

    for i, moe in enumerate(spec.moe_layers):
        b = f"blk.{i}."
        lw = LayerWeights(
            attn_norm=add(b + "attn_norm.weight", True),
            wq=add(b + "attn_q.weight"),
            wk=add(b + "attn_k.weight"),
            wv=add(b + "attn_v.weight"),
            wo=add(b + "attn_output.weight"),
            ffn_norm=add(b + "ffn_norm.weight", True),
            bq=add(b + "attn_q.bias", True),
            bk=add(b + "attn_k.bias", True),
            bv=add(b + "attn_v.bias", True),
            bo=add(b + "attn_output.bias", True),
            q_norm=vec(b + "attn_q_norm.weight"),
            k_norm=vec(b + "attn_k_norm.weight"),
        )
        if moe:
            lw.router = add(b + "ffn_gate_inp.weight")
            if experts is not None:
                lw.experts = experts(i)
            else:
                stacked = tuple(
                    add(b + f"ffn_{p}_exps.weight") for p in ("gate", "up", "down")
                )
                lw.experts = ExpertPlanes([stacked], [(0, 0, 0)], [spec.n_expert])
            lw.gate_shexp = add(b + "ffn_gate_shexp.weight")
            lw.up_shexp = add(b + "ffn_up_shexp.weight")
            lw.down_shexp = add(b + "ffn_down_shexp.weight")
            lw.gate_inp_shexp = add(b + "ffn_gate_inp_shexp.weight", True)
        else:
            lw.gate = add(b + "ffn_gate.weight")
            lw.up = add(b + "ffn_up.weight")
            lw.down = add(b + "ffn_down.weight")
        layers.append(lw)
    return layers
