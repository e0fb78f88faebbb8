"""The engine's own costs on this machine, for ``edgemoe profile --measure``:
fitted on decodes of small converted models (``runtime_costs``), what the cost
model (runtime/costmodel.py) adds to the probed rates. An app-level probe: it
converts models, so it lives with the commands."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class RuntimeCosts:
    """What the engine spends per decode token beyond the probes' figures, in
    ms, fitted on decodes (``runtime_costs``): the cost model's terms."""

    token_ms: float
    """Per step: its host work and first graph."""
    split_ms: float
    """Per host-routed MoE layer: the graph boundary and the placement."""
    plane_ms: float
    """Per expert plane the host places (at a split)."""
    read_ms: float
    """Per plane read during decode, beyond its bytes at the probed
    random-read rate: the disk's latency, and the wake-ups and core sharing
    a probe read alone misses."""
    fit_error: float
    """Largest relative error of the fit over the decodes it was fitted on."""
    table: tuple[tuple[str, float, float], ...] = ()
    """Per decode fitted: (what ran, measured ms per token, fitted ms)."""

    def apply(self, profile):
        """``profile`` with these costs."""
        return replace(
            profile,
            token_overhead_ms=self.token_ms,
            layer_overhead_ms=self.split_ms,
            plane_overhead_ms=self.plane_ms,
            storage_latency_ms=self.read_ms,
        )


CALIBRATION_MODELS = (
    # name, layers, experts, used, forced levels with every plane resident
    ("shallow", 2, 8, 2, (None,)),
    ("deep", 8, 8, 2, (None,)),
    ("small", 4, 8, 2, (None, 2, 8)),
    ("wide", 4, 64, 8, (None, 2, 8)),
)
HELD = ("small", "deep", "wide")
"""Also run just under the budget that keeps their planes resident:
host-routed (a split per MoE layer), few reads."""
STREAMED = ("small", "wide")
"""Also run from a cold cache with a third of their expert bytes."""


def runtime_costs(
    profile, threads: int | None, workdir, rounds: int = 6, n_gen: int = 64
) -> RuntimeCosts:
    """The engine's costs on this machine, fitted on decodes of small
    converted models with random weights (``CALIBRATION_MODELS``): with every
    plane resident (one graph per token) at 2, 4 and 8 layers, top-2 of 8 and
    top-8 of 64 experts, forced levels 2 and 8; host-routed just under
    the budget that keeps them resident (a split per MoE layer, few reads);
    and streaming a third of their expert bytes from a cold cache (reads).
    The models take turns, ``rounds`` rounds of ``bench`` (``reps`` 2,
    ``n_gen`` tokens of text each); the mean t/s per configuration, the
    figure ``edgemoe bench`` reports, is kept. A non-negative least-squares
    fit on relative error splits each decode's time beyond its bytes at the
    probed matvec and random-read rates into per token, per split, per plane
    placed at a split and per read.
    ``threads``: None tunes them while running, as ``edgemoe bench`` does by
    default."""
    from pathlib import Path

    from edgemoe.converters.calibration import default_text
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.converters.synth import preset_config, write_hf
    from edgemoe.runtime.bench import bench
    from edgemoe.runtime.costmodel import predict
    from edgemoe.runtime.io_queue import drop_cached
    from edgemoe.runtime.model import load
    from edgemoe.runtime.offload import resident_budget

    workdir = Path(workdir)
    # The byte terms alone: overheads out, reads at their bytes.
    bare = replace(
        profile,
        token_overhead_ms=0.0,
        layer_overhead_ms=0.0,
        plane_overhead_ms=0.0,
        storage_latency_ms=0.0,
    )
    text = default_text()[:60000]
    runs, labels = [], []
    try:
        for name, layers, experts, used, levels in CALIBRATION_MODELS:
            cfg = preset_config(
                "demo", layers, num_local_experts=experts, num_experts_per_tok=used
            )
            hf = write_hf(cfg, workdir / f"{name}-hf", force=True)
            edge = workdir / f"{name}-edge"
            convert(hf, edge, ConvertOptions(calib_tokens=512, calib_window=256))
            for level in levels:
                runs.append(load(edge, n_threads=threads, n_ctx=512, force_level=level))
                labels.append(f"{name} " + (f"level {level}" if level else "resident"))
            mp = runs[-len(levels)].memory  # HELD, STREAMED: the dual-routing run
            fixed = mp.backbone + mp.kv_cache + mp.scratch + mp.runtime
            if name in HELD:  # just under what keeps the policy's planes resident
                ckpt = runs[-len(levels)].checkpoint
                budget = resident_budget(ckpt, 512, 256, runtime=mp.runtime) - 1
                runs.append(load(edge, n_threads=threads, n_ctx=512, budget=budget))
                labels.append(f"{name} host-routed, held")
            if name in STREAMED:
                for f in edge.glob("experts-*.gguf"):
                    drop_cached(f)
                budget = fixed + mp.experts // 3
                runs.append(load(edge, n_threads=threads, n_ctx=512, budget=budget))
                labels.append(f"{name} a third of its experts, cold")
        # Round robin, so that the machine's drift hits every model alike;
        # each round decodes a fresh stretch of text.
        samples: list[list[float]] = [[] for _ in runs]
        streams = [m.tokenize(text, add_special=False) for m in runs]
        for r in range(rounds):
            for model, tokens, out in zip(runs, streams, samples):
                part = tokens[r * 2 * n_gen : (r + 1) * 2 * n_gen]
                (tg,) = bench(model, n_prompt=0, n_gen=n_gen, reps=2, tokens=part)
                out.extend(tg.tps)
        ms = np.array([1e3 / float(np.mean(out)) for out in samples])
        preds = [
            predict(
                m.checkpoint,
                bare,
                m.routed.policy,
                m.memory.slots,
                resident=m.memory.resident,
            )
            for m in runs
        ]
    finally:
        for model in runs:
            model.close()
    # ms - bytes - read bytes = token + split * splits + plane * runs placed
    #                           at splits + read * reads
    # Bytes at the probed rates: a rate fitted on these small models, which
    # a large cache may hold, would not carry to a model that streams from
    # DRAM (on this machine, 480 MiB of L3, one with OLMoE's expert shape ran
    # 2x faster than the probe, a 1 GiB model as fast). Read bytes at the
    # probed random-read rate: these models' planes are all of one size.
    x = np.array(
        [
            (1.0, p.splits, p.plane_runs if p.splits else 0.0, p.reads_per_token)
            for p in preds
        ]
    )
    known = np.array([p.backbone_ms + p.experts_ms + p.io_ms for p in preds])
    coef = nnls(x / ms[:, None], (ms - known) / ms)
    fit = x @ coef + known
    token, split, plane, read = (float(c) for c in coef)
    return RuntimeCosts(
        token_ms=max(token, 1e-3),
        split_ms=max(split, 1e-3),
        plane_ms=max(plane, 1e-4),
        read_ms=max(read, 1e-3),
        fit_error=float(np.max(np.abs(fit - ms) / ms)),
        table=tuple((lab, float(t), float(f)) for lab, t, f in zip(labels, ms, fit)),
    )


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares ``a @ x ~ b`` with ``x >= 0``: refit without the
    negative coefficients until none is left (a few unknowns only)."""
    free = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    while free.any():
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        if (sol >= 0).all():
            x[free] = sol
            break
        idx = np.flatnonzero(free)
        free[idx[np.argmin(sol)]] = False
    return x
