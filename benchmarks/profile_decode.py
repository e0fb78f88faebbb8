"""Where a decode step's time goes: inside ggml's graph compute, waiting for
expert reads, and host work (Python, numpy, ctypes) around them.

    python benchmarks/profile_decode.py MODEL [--level 4 | --quality fast]
        [--budget 1GiB] [--threads 2] [--tokens 64] [--runs 3]

ggml's time is measured around ``ggml_backend_graph_compute`` itself (a
wrapper on the ctypes function, ~1 us per call); stalls are the expert
cache's own wait time; host is the remainder of each token's wall time.
Prints milliseconds per token and graph computes per token per run (the
runs interleave nothing: the spread is the machine's), and writes
benchmarks/out/profile_decode.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def profile(model, tokens: int) -> dict:
    from edgemoe import ggml_binding

    lib = ggml_binding.lib()
    inner = lib.ggml_backend_graph_compute
    spent = [0.0]

    def timed(*args):
        t = time.perf_counter()
        try:
            return inner(*args)
        finally:
            spent[0] += time.perf_counter() - t

    stall0 = model.counters()["stall_s"]
    computes0 = model.step.computes
    lib.ggml_backend_graph_compute = timed
    try:
        t0 = time.perf_counter()
        for _ in range(tokens):
            model.eval([5])
        total = time.perf_counter() - t0
    finally:
        lib.ggml_backend_graph_compute = inner
    stall = model.counters()["stall_s"] - stall0
    ms = {
        "ggml compute": spent[0] / tokens * 1e3,
        "I/O stall": stall / tokens * 1e3,
        "host": (total - spent[0] - stall) / tokens * 1e3,
        "total": total / tokens * 1e3,
    }
    ms["host share"] = ms["host"] / ms["total"]
    ms["graphs per token"] = (model.step.computes - computes0) / tokens
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--level", type=int, help="a converted model's forced level")
    ap.add_argument("--quality", help="a converted model's dual-routing preset")
    ap.add_argument("--budget", help="a converted model's memory budget")
    args = ap.parse_args()

    import numpy as np

    import edgemoe

    opts = dict(
        n_ctx=args.prompt + args.tokens * args.runs + 8,
        n_threads=args.threads,
        force_level=args.level,
    )
    if args.budget:
        opts["budget"] = args.budget
    if args.quality:
        opts["quality"] = args.quality
    rows = []
    with edgemoe.load(args.model, **opts) as model:
        hi = min(model.spec.n_vocab, 5000)  # the fixture has 4,096 tokens
        prompt = np.random.default_rng(0).integers(10, hi, args.prompt).tolist()
        model.eval(prompt)
        for _ in range(args.runs):
            rows.append(profile(model, args.tokens))
    at = f", level {args.level}" if args.level else ""
    at += f", quality {args.quality}" if args.quality else ""
    at += f", budget {args.budget}" if args.budget else ""
    print(f"{Path(args.model).name}{at}, {args.threads} threads, per decoded token:")
    for key in rows[0]:
        vals = [r[key] for r in rows]
        unit = "" if key in ("host share", "graphs per token") else " ms"
        cells = "  ".join(f"{v:7.3f}" for v in vals)
        print(f"  {key:<17} {cells}{unit}   (runs)")
    OUT.mkdir(exist_ok=True)
    (OUT / "profile_decode.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "level": args.level,
                "quality": args.quality,
                "budget": args.budget,
                "threads": args.threads,
                "runs": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
