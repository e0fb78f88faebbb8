"""The forward pass as ggml graphs: a whole step in one graph, split only
where the host must decide.

A step is T tokens of one or more sequences: embeddings in, every layer
(norms, q/k/v, q/k norms, RoPE, the KV cache written in-graph, masked GQA
attention, routing, experts, residuals) and the head, logits out. With every
expert in the graph that is one compute. A layer whose experts the host
places (a converted model's expert cache under a budget, or dual routing
choosing levels per token) ends a graph after its router: the host reads
the chosen experts, schedules their planes and fills slot ids, and the next
graph starts with those experts. So a step computes 1 + (host-routed MoE
layers) graphs at most.
Legend: T tokens, R rows that reach the head, D hidden, E experts, K experts
per token, F expert FFN, P planes, C cache cells, n_kv cells attended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgemoe import rope
from edgemoe.checkpoint.base import aligned_empty
from edgemoe.runtime import attention_block, moe_block
from edgemoe.runtime.device import T
from edgemoe.runtime.graph import Graph
from edgemoe.runtime.layers import LayerWeights
from edgemoe.runtime.step_ops import NEG_BIG

CACHED_T = 16
"""Steps of at most this many tokens (decode, batched decode) keep their
graphs and re-run them; longer ones (prefill) build, run and free."""


@dataclass(frozen=True)
class StepShape:
    t: int
    n_kv: int
    n_out: int
    """Rows that reach the head: each sequence's last token, or all T."""


def _a(shape, dtype=np.float32) -> np.ndarray:
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def _const(values: np.ndarray) -> np.ndarray:
    """An aligned float32 copy of ``values``: a graph constant's host array."""
    out = _a(values.shape)
    out[...] = values
    return out


class Carry:
    """What crosses a split after MoE layer l's router, for ``rows`` rows:
    the residual (with any shared expert), the normed input, the in-graph
    top-k, and the slot ids, weights and plane scales the host fills."""

    def __init__(self, rows: int, d: int, k: int, n_planes: int):
        self.rows = rows
        self.h, self.hn = _a((rows, d)), _a((rows, d))
        self.ids, self.w = _a((rows, k), np.int32), _a((rows, k, 1))
        self.pids = _a((n_planes, rows, k), np.int32)
        self.eids = _a((rows, k), np.int32)
        """The expert ids of ``pids``' order (expert biases index them)."""
        self.rw = _a((rows, k))
        self.scales = _a((n_planes, 3))
        self.xout = _a((rows, d))
        """With ``Step.probe``: the residual right after this layer's experts."""


class StepIO:
    """The host arrays of one step shape: inputs, carries and outputs."""

    def __init__(self, spec, shape: StepShape, n_planes: int, moe_layers):
        t, d = shape.t, spec.n_embd
        self.shape = shape
        self.x = _a((t, d))
        self.pos = _a((t,), np.int32)
        self.cells = _a((t,), np.int32)
        self.mask = _a((t, shape.n_kv), np.float16)  # flash_attn_ext's type
        self.mask_swa = _a((t, shape.n_kv), np.float16) if spec.swa_layers else None
        """Windowed layers' mask where the model mixes them with full ones."""
        self.out_ids = _a((shape.n_out,), np.int32)
        self.logits = _a((shape.n_out, spec.n_vocab))
        k = max(spec.n_expert_used, 1)
        last = spec.n_layer - 1
        self.routes = {
            il: _a((shape.n_out if il == last else t, k), np.int32) for il in moe_layers
        }
        """MoE layer -> each row's experts this step, largest weight first."""
        self.carry = {rows: Carry(rows, d, k, n_planes) for rows in {t, shape.n_out}}


class Step:
    """Builds, caches and runs the graphs of forward steps over one model."""

    def __init__(self, spec, device, layers: list[LayerWeights], cache, head):
        self.spec, self.device, self.layers, self.cache = spec, device, layers, cache
        self.out_norm, self.out = head
        self.splits = [
            il for il, w in enumerate(layers) if w.experts and w.experts.host_routed
        ]
        self.moe_layers = [il for il, w in enumerate(layers) if w.experts]
        self.n_planes = max(
            (len(w.experts.tensors) for w in layers if w.experts), default=1
        )
        self.router = None
        """Host-routed layers (runtime/routed.py): ``place(layer, carry,
        run_partial) -> counts`` fills the carry's slot ids and weights,
        ``counts[p]`` experts per row running plane p; ``release()``."""
        self._graphs: dict[tuple, Graph] = {}
        self._io: dict[StepShape, StepIO] = {}
        self._tables: dict[int, np.ndarray] = {}
        """MoE layer -> its protected experts' slot table (moe_block)."""
        self._galloc = None
        self.computes = 0
        """Graph computes so far (tests assert the count per step)."""
        self.probe = False
        """Tests: host-routed layers also output their residual after the
        experts (``Carry.xout``); set before the first step."""
        self.compute_s = 0.0
        ff = rope.freq_factors(spec)
        self._rope_ff = None if ff is None else _const(ff)
        self._rope_scale = rope.attn_factor(spec)
        self._groups = None
        if spec.n_group > 1:  # group-limited routing's constants
            eye, big = _const(np.eye(spec.n_group)), _const(np.full(1, NEG_BIG))
            self._groups = (spec.topk_group, eye, big)

    # -- running ---------------------------------------------------------------
    def io(self, shape: StepShape) -> StepIO:
        if shape.t > CACHED_T:
            return self._new_io(shape)
        io = self._io.get(shape)
        if io is None:
            # A new span (n_kv) replaces the old one's graphs: memory stays
            # flat as the context fills.
            for old in [k for k in self._io if k.t == shape.t]:
                del self._io[old]
                for key in [k for k in self._graphs if k[0] == old]:
                    self._graphs.pop(key).free()
            io = self._io[shape] = self._new_io(shape)
        return io

    def _new_io(self, shape: StepShape) -> StepIO:
        return StepIO(self.spec, shape, self.n_planes, self.moe_layers)

    def run(self, io: StepIO) -> None:
        """Every graph of the step, host decisions between them."""
        counts = ()
        cached = io.shape.t <= CACHED_T
        for s in range(len(self.splits) + 1):
            key = (io.shape, s, counts)
            g = self._graphs.get(key) if cached else None
            if g is None:
                g = self._build(io, s, counts, cached)
                if cached:
                    self._graphs[key] = g
            t0 = time.perf_counter()
            try:
                g.compute()
            finally:
                if not cached:
                    g.free()
            self.compute_s += time.perf_counter() - t0
            self.computes += 1
            if s < len(self.splits):
                layer = self.splits[s]
                carry = io.carry[self._rows(io, layer)]
                counts = self.router.place(
                    layer, carry, lambda c: self._partial(layer, carry, c)
                )
        if self.splits:
            self.router.release()

    def _partial(self, layer: int, carry: Carry, counts) -> None:
        """One batch of a layer's experts when they cannot all be resident at
        once: carry.h += their output (a graph of its own, prefill only)."""
        g = Graph(
            self.device,
            n_tensors=64 + 48 * self.n_planes,
            galloc=self._prefill_galloc(),
        )
        try:
            ep = self.layers[layer].experts
            math = self._math(layer)
            out = g.add(
                g.input(carry.h), moe_block.host_placed(g, carry, ep, counts, math)
            )
            acc = _a(carry.h.shape)
            g.output(out, acc)
            g.build()
            t0 = time.perf_counter()
            g.compute()
            self.compute_s += time.perf_counter() - t0
            self.computes += 1
            carry.h[...] = acc
        finally:
            g.free()

    def _prefill_galloc(self) -> int:
        if self._galloc is None:
            self._galloc = self.device.new_allocator()
        return self._galloc

    def routes(self, io: StepIO) -> dict[int, np.ndarray]:
        """The last step's experts per MoE layer, [R, K] copies."""
        out = {il: r.copy() for il, r in io.routes.items()}
        for il in self.splits:
            out[il] = io.carry[self._rows(io, il)].ids.copy()
        return dict(sorted(out.items()))

    def _rows(self, io: StepIO, layer: int) -> int:
        return io.shape.n_out if layer == self.spec.n_layer - 1 else io.shape.t

    def free(self) -> None:
        for g in self._graphs.values():
            g.free()
        self._graphs.clear()
        self._io.clear()
        if self._galloc is not None:
            self.device.free_allocator(self._galloc)
            self._galloc = None

    # -- building ----------------------------------------------------------------
    def _span(self, s: int) -> tuple[int, int]:
        """Segment s's first and last layer (a split layer ends its segment)."""
        first = 0 if s == 0 else self.splits[s - 1] + 1
        last = self.splits[s] if s < len(self.splits) else self.spec.n_layer - 1
        return first, last

    def _build(self, io: StepIO, s: int, counts: tuple, cached: bool) -> Graph:
        first, last = self._span(s)
        # Tensors a layer creates (attention ~40, FFN and routing ~24, each
        # plane's projections, the sum over K), plus inputs and the head: a
        # cached graph's metadata is sized by this, so keep it close.
        k, p = self.spec.n_expert_used, self.n_planes
        per_layer = 72 + 12 * p + 2 * k
        n = 48 + per_layer * (last - first + 1 + (s > 0))
        galloc = None if cached else self._prefill_galloc()
        g = Graph(self.device, n_tensors=n, galloc=galloc)
        try:
            self._segment(g, io, s, counts)
            g.build()
        except BaseException:
            g.free()
            raise
        return g

    def _segment(self, g: Graph, io: StepIO, s: int, counts: tuple) -> None:
        shape = io.shape
        self._in = {
            "pos": g.input(io.pos),
            "cells": g.ids(io.cells, self.cache.n_cells),
            "mask": g.input(io.mask),
            "mask_swa": g.input(io.mask_swa) if io.mask_swa is not None else None,
            "rope_ff": g.input(self._rope_ff) if self._rope_ff is not None else None,
            "groups": (
                None
                if self._groups is None
                else (self._groups[0], *(g.input(a) for a in self._groups[1:]))
            ),
            "out": (g.ids(io.out_ids, shape.t) if shape.n_out < shape.t else None),
        }
        first, last = self._span(s)
        stop = last if s < len(self.splits) else None
        if s == 0:
            x = g.input(io.x)  # [D, T]
        else:
            layer = self.splits[s - 1]
            c = io.carry[self._rows(io, layer)]
            x = g.add(
                g.input(c.h),
                moe_block.host_placed(
                    g, c, self.layers[layer].experts, counts, self._math(layer)
                ),
            )
            if self.probe:
                g.output(x, c.xout)
        for il in range(first, self.spec.n_layer):
            x = self._layer(g, io, il, x, split=il == stop)
            if x is None:
                return
        normed = g.mul(g.rms_norm(x, self.spec.rms_eps), self.out_norm)
        g.output(g.mul_mat(self.out, normed), io.logits)  # [V, R]

    def _layer(self, g: Graph, io: StepIO, il: int, x: T, split: bool) -> T | None:
        """One transformer block on x [D, T]; None after a split's outputs."""
        w, eps = self.layers[il], self.spec.rms_eps
        a = self._attention(g, il, w, g.mul(g.rms_norm(x, eps), w.attn_norm))
        if il == self.spec.n_layer - 1 and self._in["out"] is not None:
            # Only the rows whose logits are wanted go on (their keys and
            # values are in the cache already), as llama.cpp does.
            a, x = g.get_rows(a, self._in["out"]), g.get_rows(x, self._in["out"])
        o = g.mul_mat(w.wo, a)
        h = g.add(x, g.add(o, w.bo) if w.bo is not None else o)  # [D, R]
        hn = g.mul(g.rms_norm(h, eps), w.ffn_norm)
        if w.experts is None:
            return g.add(h, self._mlp(g, hn, w.gate, w.up, w.down))
        if w.gate_shexp is not None:
            shared = self._mlp(g, hn, w.gate_shexp, w.up_shexp, w.down_shexp)
            if w.gate_inp_shexp is not None:
                shared = g.mul(shared, g.sigmoid(g.mul_mat(w.gate_inp_shexp, hn)))
            h = g.add(h, shared)
        s = self.spec
        logits = g.mul_mat(w.router, hn)  # [E, R]
        if w.router_bias is not None:
            logits = g.add(logits, w.router_bias)
        ids, weights = g.route(
            logits, s.n_expert_used, s.router, s.norm_topk_prob, w.select_bias,
            s.routed_scale, self._in["groups"],
        )  # fmt: skip
        # ids [K, R], weights [1, K, R]
        rows = g.cont(ids)
        if split:
            c = io.carry[hn.ne[1]]
            if weights.view:  # topk_softmax's reshape: an output needs its own data
                weights = g.cont(weights)
            for t, a_ in ((h, c.h), (hn, c.hn), (rows, c.ids), (weights, c.w)):
                g.output(t, a_)
            return None
        g.output(rows, io.routes[il])
        ep = w.experts
        if ep.protected and il not in self._tables:
            self._tables[il] = moe_block.protect_table(ep)
        table = self._tables.get(il)
        math = self._math(il)
        return g.add(h, moe_block.in_graph(g, hn, ids, weights, ep, table, math))

    def _attention(self, g: Graph, il: int, w: LayerWeights, xn: T) -> T:
        """Self-attention of normed xn [D, T] -> [H * Dv, T] (before wo)."""
        at = attention_block.StepInputs(
            self.spec, self.cache, self._in["pos"], self._in["cells"],
            self._in["mask"], self._in["mask_swa"], self._in["rope_ff"],
            self._rope_scale,
        )  # fmt: skip
        if w.mla is not None:
            return attention_block.latent(g, at, il, w, xn)
        return attention_block.gqa(g, at, il, w, xn)

    @staticmethod
    def _mlp(g: Graph, x: T, gate: T, up: T, down: T) -> T:
        return g.mul_mat(down, g.swiglu(g.mul_mat(gate, x), g.mul_mat(up, x)))

    def _math(self, layer: int) -> moe_block.ExpertMath:
        """Layer ``layer``'s expert biases and activation."""
        s = self.spec
        oai = (s.swiglu_alpha, s.swiglu_limit) if s.ffn_act == "swiglu_oai" else None
        return moe_block.ExpertMath(self.layers[layer].expert_bias, oai)
