"""Where a decode step's time goes: ggml graphs vs the numpy glue between them.

    python benchmarks/profile_decode.py MODEL [--level 4] [--threads 2] [--tokens 32]

Times each part with a wrapper around it (the wrappers cost ~1 us per call):
ggml graph computes, numpy attention, routing, and the rest (embedding
lookup, Python) as the remainder. Prints milliseconds per token and writes
benchmarks/out/profile_decode.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--level", type=int, help="a converted model's forced level")
    args = ap.parse_args()

    import numpy as np

    import edgemoe
    from edgemoe.runtime import forward, graph

    model = edgemoe.load(
        args.model,
        n_ctx=args.prompt + args.tokens + 8,
        n_threads=args.threads,
        force_level=args.level,
    )
    prompt = np.random.default_rng(0).integers(10, 5000, args.prompt).tolist()
    model.eval(prompt)
    spent: dict[str, float] = {}

    def timed(owner, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(graph.Graph, "compute", "ggml graphs")
    timed(type(model.forward.attention), "__call__", "numpy attention")
    timed(forward, "route", "routing")  # looked up as a module global per call
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        model.eval([5])
    total = time.perf_counter() - t0
    per_token = {k: v / args.tokens * 1e3 for k, v in spent.items()}
    per_token["other"] = total / args.tokens * 1e3 - sum(per_token.values())
    per_token["total"] = total / args.tokens * 1e3
    at = f", level {args.level}" if args.level else ""
    print(f"{Path(args.model).name}{at}, {args.threads} threads, ms per decoded token:")
    for k, v in per_token.items():
        print(f"  {k:<16} {v:7.2f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "profile_decode.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "level": args.level,
                "threads": args.threads,
                "ms_per_token": per_token,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
