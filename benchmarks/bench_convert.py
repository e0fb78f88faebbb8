"""Conversion cost on a realistic-size checkpoint: time and peak RSS.

    python benchmarks/bench_convert.py [--preset olmoe-1b-7b] [--layers 2] [--runs 2]

Synthesises an HF checkpoint (bf16, random weights) of the preset's shapes,
converts it with ``edgemoe convert`` as a user runs it (its defaults, 4,096
calibration tokens unless ``--calib-tokens``) in a child process per run, and
reports the time, the throughput in MB/s of bf16 source, and the child's
peak RSS next to the size of one layer's experts in float32 and of the whole
checkpoint. Writes benchmarks/out/convert.json.
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
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak
            times.append(time.perf_counter() - t0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                print(err.read().decode(errors="replace"), file=sys.stderr)
                return 1
        peaks.append(usage.ru_maxrss * 1024)
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
    (OUT / "convert.json").write_text(json.dumps(rep, indent=1))
    print("| model | source | time (median, range) | MB/s | peak RSS |", end="")
    print(" one layer's experts, f32 |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.preset} x{args.layers} layers | {src_bytes / 2**20:,.0f} MiB bf16 | "
        f"{seconds:,.0f} s [{min(times):,.0f}-{max(times):,.0f}] | {mbs:.1f} | "
        f"{peak / 2**20:,.0f} MiB | {layer_f32 / 2**20:,.0f} MiB |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
