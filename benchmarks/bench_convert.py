"""Conversion cost on a realistic-size checkpoint: time and peak RSS.

    python benchmarks/bench_convert.py [--preset olmoe-1b-7b] [--layers 2]

Synthesises an HF checkpoint (bf16, random weights) of the preset's shapes,
converts it with ``edgemoe convert`` in a child process and reports the
child's peak RSS next to the size of one layer's experts in float32 (what the
converter holds at once) and of the whole checkpoint. Writes
benchmarks/out/convert.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--levels", default="2,4,8")
    args = ap.parse_args()

    from edgemoe.converters import synth

    cfg = synth.preset_config(args.preset, layers=args.layers)
    work = OUT / "convert"
    src, dst = work / f"{args.preset}-L{args.layers}-hf", work / "edge"
    if not src.exists():
        print(f"synthesising {src.name} ...", file=sys.stderr)
        synth.write_hf(cfg, src)
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "edgemoe",
        "convert",
        str(src),
        "-o",
        str(dst),
        "--levels",
        args.levels,
        "--calib-tokens",
        str(args.calib_tokens),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=OUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    d = cfg["hidden_size"]
    f = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    layer_f32 = 3 * n_exp * f * d * 4
    src_bytes = sum(p.stat().st_size for p in src.iterdir())
    out_bytes = sum(p.stat().st_size for p in dst.iterdir())
    rep = {
        "preset": args.preset,
        "layers": args.layers,
        "levels": args.levels,
        "calib_tokens": args.calib_tokens,
        "seconds": seconds,
        "peak_rss_mib": peak / 2**20,
        "layer_experts_f32_mib": layer_f32 / 2**20,
        "source_mib": src_bytes / 2**20,
        "output_mib": out_bytes / 2**20,
    }
    (OUT / "convert.json").write_text(json.dumps(rep, indent=1))
    print(
        f"| {args.preset} x{args.layers} layers | {src_bytes / 2**20:,.0f} MiB bf16 | "
        f"{seconds:,.0f} s | {peak / 2**20:,.0f} MiB | {layer_f32 / 2**20:,.0f} MiB |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
