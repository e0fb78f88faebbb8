"""One MoE layer of ``edgemoe convert``: calibrate its experts on the
layer's inputs, measure them (hotness, importance weights, super experts,
the next layer's guess) and quantize each into nested planes, reading one
expert at a time (twice: for calibration, then for its planes), so a layer's
experts are never all in memory.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgemoe.checkpoint.base import Weight, load_expert
from edgemoe.converters.calibration import dense_mlp, trace_rows
from edgemoe.converters.padding import pad_cols, pad_rows, padded_width
from edgemoe.errors import ModelFileError
from edgemoe.quant.nested import plane_shifts, quantize_nested


def _expert_float(w: Weight, rows: int) -> np.ndarray:
    """One expert's [N, K] weight as float32, rows zero-padded to ``rows``."""
    x = w.data if w.qtype == 0 else w.to_float32()
    if x.shape[0] == rows:
        return np.asarray(x, dtype=np.float32)
    out = np.zeros((rows, x.shape[1]), dtype=np.float32)
    out[: x.shape[0]] = x
    return out


def next_layer_guess(ckpt, layer: int, hn: np.ndarray, names) -> np.ndarray | None:
    """[S, K] experts the runtime's prefetch would guess for the next MoE
    layer at the traced tokens: its router on this layer's input, best first."""
    spec = ckpt.spec
    nxt = next((i for i in range(layer + 1, spec.n_layer) if spec.moe_layers[i]), None)
    name = f"blk.{nxt}.ffn_gate_inp.weight"
    if nxt is None or name not in names:
        return None
    router = ckpt.load(name).to_float32()  # [E, D]
    logits = hn[trace_rows(len(hn))] @ router.T  # [S, E]
    bias = f"blk.{nxt}.ffn_gate_inp.bias"
    if bias in names:
        logits = logits + ckpt.load(bias).to_float32()
    return np.argsort(-logits, axis=1, kind="stable")[:, : spec.n_expert_used]


def moe_layer(ckpt, writer, layer, hn, runner, plan, f_pad, names, f32, step):
    """Calibrate, measure and quantize one MoE layer's experts, reading one
    expert at a time (twice: for calibration, then for its planes), so the
    layer's experts are never all in memory."""
    spec = ckpt.spec
    b = f"blk.{layer}."
    rows = {"gate": spec.expert_ffn, "up": spec.expert_ffn, "down": spec.n_embd}
    amax = dict.fromkeys(rows, 1e-30)  # the layer's largest |w|, per projection
    seen: set[int] = set()

    def expert(e: int):  # float32 gate [F, D], up [F, D], down [D, F]
        mats = tuple(
            _expert_float(load_expert(ckpt, b + f"ffn_{p}_exps.weight", e), n)
            for p, n in rows.items()
        )
        if e not in seen:
            seen.add(e)
            for p, m in zip(rows, mats):
                top = float(np.abs(m).max())
                if not math.isfinite(top):  # the fits would turn it into noise
                    raise ModelFileError(
                        ckpt.path,
                        f"{b}ffn_{p}_exps.weight, expert {e}: NaN or infinite "
                        "weights (the checkpoint is damaged)",
                    )
                amax[p] = max(amax[p], top)
        return mats

    bias = None
    if spec.moe_bias:  # [E, F], [E, F], [E, D]: rows by expert
        biases = [f32(f"ffn_{p}_exps.bias") for p in ("gate", "up", "down")]

        def bias(e: int):
            return tuple(b[e] for b in biases)

    routed, stats = runner.moe(
        hn, f32("ffn_gate_inp"), expert, f32("ffn_gate_inp.bias"), bias,
        select=f32("exp_probs_b.bias"),
    )  # fmt: skip
    for e in sorted(set(range(spec.n_expert)) - seen):  # no token picked them
        expert(e)
    if b + "ffn_gate_shexp.weight" in names:
        shared = dense_mlp(
            hn, f32("ffn_gate_shexp"), f32("ffn_up_shexp"), f32("ffn_down_shexp")
        )
        gate_inp = f32("ffn_gate_inp_shexp")
        if gate_inp is not None:
            shared = shared * (1.0 / (1.0 + np.exp(-(hn @ gate_inp.reshape(-1, 1)))))
        routed = routed + shared
    layer_shifts = tuple(plane_shifts(plan, amax[p]) for p in rows)

    d = padded_width(spec.n_embd, plan)

    def quantize(e: int) -> list:
        g, u, dn = expert(e)
        imat = stats.imatrix(e)  # down is not weighted: see calibration.py
        if d != spec.n_embd:  # padded inputs are zero: any weight will do
            imat = pad_cols(imat[None], d, imat.mean())[0]
        return [
            quantize_nested(m, plan, sh, w)[0].planes
            for m, sh, w in (
                (pad_cols(pad_rows(g, f_pad), d), layer_shifts[0], imat),
                (pad_cols(pad_rows(u, f_pad), d), layer_shifts[1], imat),
                (pad_rows(pad_cols(dn, f_pad), d), layer_shifts[2], None),
            )
        ]

    # ggml and numpy release the GIL: experts quantize in parallel,
    # a bounded window ahead, and are written in order.
    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        pending = {}
        for e in range(spec.n_expert):
            pending[e] = pool.submit(quantize, e)
            if len(pending) < workers and e + 1 < spec.n_expert:
                continue
            done = min(pending)
            planes = pending.pop(done).result()
            step("experts", done + 1, spec.n_expert)
            for p in range(len(plan.planes)):
                writer.add_plane(layer, done, p, [planes[j][p] for j in range(3)])
        for done in sorted(pending):
            planes = pending.pop(done).result()
            step("experts", done + 1, spec.n_expert)
            for p in range(len(plan.planes)):
                writer.add_plane(layer, done, p, [planes[j][p] for j in range(3)])
    return routed, stats, layer_shifts
