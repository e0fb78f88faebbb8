"""One MoE layer of ``edgemoe convert``: calibrate its experts on the
layer's inputs, measure them (hotness, importance weights, super experts,
the next layer's guess) and quantize each into nested planes, reading one
expert at a time (twice: for calibration, then for its planes), so a layer's
experts are never all in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgemoe.checkpoint.base import Weight, load_expert
from edgemoe.converters.calibration import dense_mlp, trace_rows
from edgemoe.converters.padding import pad_cols, pad_rows, padded_width
from edgemoe.errors import ModelFileError
from edgemoe.quant.nested import plane_shifts, quantize_nested
from edgemoe.quant.types import NestedQuant


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


def moe_layer(ckpt, writer, layer, hn, runner, plan, f_pad, names, f32, step, fits):
    """Calibrate, measure and quantize one MoE layer's experts, reading one
    expert at a time (twice: for calibration, then for its planes), so the
    layer's experts are never all in memory; ``fits`` (a FitPool) fits them."""
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
    # Workers read experts stored apart themselves; a stack's are sent.
    apart = getattr(ckpt, "experts_apart", lambda name: True)
    send = not all(apart(b + f"ffn_{p}_exps.weight") for p in rows)

    def job(e: int) -> FitJob:
        imat = stats.imatrix(e)  # down is not weighted: see calibration.py
        if d != spec.n_embd:  # padded inputs are zero: any weight will do
            imat = pad_cols(imat[None], d, imat.mean())[0]
        return FitJob(
            str(ckpt.path), b, e, tuple(rows.items()), f_pad, d, plan,
            layer_shifts, imat, expert(e) if send else None,
        )  # fmt: skip

    # Experts fit in parallel, a bounded window ahead, written in order.
    window = fits.workers
    pending = {}
    try:
        for e in range(spec.n_expert):
            pending[e] = fits.submit(job(e))
            if len(pending) < window and e + 1 < spec.n_expert:
                continue
            _write_next(writer, layer, pending, spec.n_expert, len(plan.planes), step)
        while pending:
            _write_next(writer, layer, pending, spec.n_expert, len(plan.planes), step)
    finally:
        for f in pending.values():
            f.cancel()
    return routed, stats, layer_shifts


def _write_next(writer, layer, pending, n_expert, n_planes, step) -> None:
    done = min(pending)
    planes = pending.pop(done).result()
    step("experts", done + 1, n_expert)
    for p in range(n_planes):
        writer.add_plane(layer, done, p, [planes[j][p] for j in range(3)])


@dataclass(frozen=True)
class FitJob:
    """One expert's fit, as a worker process receives it."""

    source: str
    """The checkpoint's path; the worker opens it once."""
    prefix: str  # "blk.N."
    expert: int
    rows: tuple[tuple[str, int], ...]
    """(projection, its rows) for gate, up and down."""
    f_pad: int
    width: int  # the hidden size padded to whole blocks
    plan: NestedQuant
    shifts: tuple[tuple[int, ...], ...]  # per projection, per plane
    imatrix: np.ndarray  # [width], gate/up importance
    mats: tuple[np.ndarray, ...] | None = None
    """The float matrices where the caller sends them (a stacked source)."""


def fit_expert(job: FitJob, checkpoints: dict) -> list[tuple[np.ndarray, ...]]:
    """Planes of ``job``'s gate, up and down (each a tuple of block bytes),
    opening its checkpoint once per ``checkpoints`` cache."""
    mats = job.mats
    if mats is None:
        from edgemoe.checkpoint import open_checkpoint

        ckpt = checkpoints.get(job.source)
        if ckpt is None:
            ckpt = checkpoints[job.source] = open_checkpoint(job.source)
        mats = tuple(
            _expert_float(
                load_expert(ckpt, f"{job.prefix}ffn_{p}_exps.weight", job.expert), n
            )
            for p, n in job.rows
        )
    g, u, dn = mats
    f, d = job.f_pad, job.width
    return [
        quantize_nested(m, job.plan, sh, w)[0].planes
        for m, sh, w in (
            (pad_cols(pad_rows(g, f), d), job.shifts[0], job.imatrix),
            (pad_cols(pad_rows(u, f), d), job.shifts[1], job.imatrix),
            (pad_rows(pad_cols(dn, f), d), job.shifts[2], None),
        )
    ]
