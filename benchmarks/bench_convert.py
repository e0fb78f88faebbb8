"""Conversion cost on a realistic-size checkpoint: time and peak RSS.

    python benchmarks/bench_convert.py [--preset olmoe-1b-7b] [--layers 2] [--runs 2]

Synthesises an HF checkpoint (bf16, random weights) of the preset's shapes,
converts it with ``edgemoe convert`` as a user runs it (its defaults, 4,096
calibration tokens unless ``--calib-tokens``) in a child process per run, and
reports the time, the throughput in MB/s of bf16 source, and the peak RSS
of the converter and its fitting processes together (sampled every 50 ms)
next to the size of one layer's experts in float32 and of the whole
checkpoint; then what each plane's fit alone costs per layer on one thread,
and the conversion speed that cost caps on this machine's cores. Writes
benchmarks/out/convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=None)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--levels", default="2,4,8")
    args = ap.parse_args()

    from edgemoe.converters import synth

    cfg = synth.preset_config(args.preset, layers=args.layers)
    work = OUT / "convert"
    src, dst = work / f"{args.preset}-L{args.layers}-hf", work / "edge"
    if not src.exists():
        print(f"synthesising {src.name} ...", file=sys.stderr)
        synth.write_hf(cfg, src)
    cmd = [sys.executable, "-m", "edgemoe", "convert", str(src), "-o", str(dst)]
    cmd += ["--levels", args.levels]
    if args.calib_tokens is not None:
        cmd += ["--calib-tokens", str(args.calib_tokens)]
    times, peaks = [], []
    for _ in range(args.runs):
        shutil.rmtree(dst, ignore_errors=True)
        with tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            peak = [0]
            sampler = threading.Thread(target=sample_rss, args=(proc, peak))
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            times.append(time.perf_counter() - t0)
            sampler.join()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                print(err.read().decode(errors="replace"), file=sys.stderr)
                return 1
        # The sum over the converter and its fitting processes, sampled; at
        # least the largest single process's own peak.
        peaks.append(max(peak[0], usage.ru_maxrss * 1024))
    seconds, peak = statistics.median(times), max(peaks)
    d = cfg["hidden_size"]
    f = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    layer_f32 = 3 * n_exp * f * d * 4
    src_bytes = sum(p.stat().st_size for p in src.iterdir())
    out_bytes = sum(p.stat().st_size for p in dst.iterdir())
    mbs = src_bytes / 1e6 / seconds
    rep = {
        "preset": args.preset,
        "layers": args.layers,
        "levels": args.levels,
        "calib_tokens": args.calib_tokens or "default",
        "seconds": times,
        "mb_per_s": src_bytes / 1e6 / seconds,
        "peak_rss_mib": [p / 2**20 for p in peaks],
        "layer_experts_f32_mib": layer_f32 / 2**20,
        "source_mib": src_bytes / 2**20,
        "output_mib": out_bytes / 2**20,
    }
    rep["fits"] = fit_costs(f, d, 3 * n_exp, args.levels)
    (OUT / "convert.json").write_text(json.dumps(rep, indent=1))
    print("| model | source | time (median, range) | MB/s | peak RSS |", end="")
    print(" one layer's experts, f32 |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.preset} x{args.layers} layers | {src_bytes / 2**20:,.0f} MiB bf16 | "
        f"{seconds:,.0f} s [{min(times):,.0f}-{max(times):,.0f}] | {mbs:.1f} | "
        f"{peak / 2**20:,.0f} MiB | {layer_f32 / 2**20:,.0f} MiB |"
    )
    cores = os.cpu_count() or 1
    layer_mb = 3 * n_exp * f * d * 2 / 1e6
    print("\n| plane fit (one thread) | core-s per layer ", end="")
    print(f"| MB/s ceiling on {cores} cores |")
    print("|---|---|---|")
    for name, per_layer in rep["fits"].items():
        print(f"| {name} | {per_layer:.1f} | {layer_mb * cores / per_layer:.0f} |")
    return 0


def sample_rss(proc, peak: list, every: float = 0.05) -> None:
    """The largest sum of RSS over ``proc`` and its descendants, every
    ``every`` seconds until it exits, into ``peak[0]``."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        while proc.returncode is None and root.status() != psutil.STATUS_ZOMBIE:
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(every)
    except psutil.Error:  # it exited between samples
        pass


def fit_costs(f: int, d: int, matrices: int, levels: str) -> dict[str, float]:
    """Single-thread seconds each plane's fit takes over one layer's
    ``matrices`` expert matrices of [f, d] (best of 3 on one): the bound
    that fit alone puts on conversion speed, whatever else is made fast."""
    import numpy as np

    from edgemoe.quant.kquants import codec
    from edgemoe.quant.types import NestedQuant

    rng = np.random.default_rng(0)
    rows = min(f, 256)  # small enough that ggml_quant runs it on one thread
    w = rng.standard_normal((rows, d), dtype=np.float32)
    imatrix = rng.gamma(1.0, size=d).astype(np.float32)
    planes = NestedQuant.parse(levels).planes
    first = codec(planes[0].name)
    fits = {
        f"plane 1 {planes[0].name}, importance-weighted quick fit (the default)": (
            lambda: first.quantize_quick(w, imatrix)
        ),
        f"plane 1 {planes[0].name}, importance-weighted search (ggml)": (
            lambda: first.quantize(w, imatrix)
        ),
        f"plane 1 {planes[0].name}, reference rounding (ggml)": (
            lambda: first.quantize(w, fit=False)
        ),
    }
    for i, p in enumerate(planes[1:], start=2):
        c = codec(p.name)
        if c.WEIGHTED_QUICK:
            fits[f"plane {i} {p.name}, importance-weighted quick fit (the default)"] = (
                lambda c=c: c.quantize_quick(w, imatrix, residual=True)
            )
            fits[f"plane {i} {p.name}, unweighted quick fit"] = lambda c=c: (
                c.quantize_quick(w)
            )
        else:
            fits[f"plane {i} {p.name}, numpy quick fit (the default)"] = lambda c=c: (
                c.quantize_quick(w)
            )
    out = {}
    for name, fn in fits.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = min(times) * matrices * f / rows
    return out


if __name__ == "__main__":
    raise SystemExit(main())
