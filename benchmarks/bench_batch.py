"""Batched decode: aggregate tokens/s of B sequences decoded together (one
graph per step over the next token of each) against one sequence alone.

    python benchmarks/bench_batch.py MODEL [--seqs 1,2,4,8] [--prompt 64]
        [--gen 32] [--runs 3] [--threads 2] [--level L]

One model, loaded once with room for every sequence; per run and batch size,
B fresh sequences are prefilled with different random prompts (one step) and
then decoded ``--gen`` steps with greedy tokens; batch sizes interleave run
by run. Prints the median aggregate decode t/s, its range and the ratio to
B = 1; writes benchmarks/out/batch.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def run_batch(model, b: int, n_prompt: int, n_gen: int, seed: int) -> float:
    import numpy as np

    rng = np.random.default_rng(seed)
    hi = min(model.spec.n_vocab, 5000)
    seqs = [model.new_sequence() for _ in range(b)]
    try:
        prompts = [rng.integers(10, hi, n_prompt).tolist() for _ in range(b)]
        logits = model.decode(list(zip(seqs, prompts)))
        t0 = time.perf_counter()
        for _ in range(n_gen):
            nxt = [[int(np.argmax(row))] for row in logits]
            logits = model.decode(list(zip(seqs, nxt)))
        return b * n_gen / (time.perf_counter() - t0)
    finally:
        for s in seqs:
            model.free_sequence(s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--seqs", default="1,2,4,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--level", type=int, help="a converted model's forced level")
    args = ap.parse_args()

    import edgemoe

    sizes = [int(x) for x in args.seqs.split(",")]
    n_ctx = max(sizes) * (args.prompt + args.gen + 1)
    tps: dict[int, list[float]] = {b: [] for b in sizes}
    with edgemoe.load(
        args.model, n_ctx=n_ctx, n_threads=args.threads, force_level=args.level
    ) as m:
        run_batch(m, 1, 8, 2, seed=99)  # warm-up: graphs, pages
        for r in range(args.runs):
            for b in sizes:
                tps[b].append(run_batch(m, b, args.prompt, args.gen, seed=r))
    base = statistics.median(tps[sizes[0]])
    at = f", level {args.level}" if args.level else ""
    print(
        f"\n{Path(args.model).name}{at}, {args.threads} threads, {args.prompt}-token "
        f"prompts, {args.gen} decode steps, {args.runs} runs\n"
    )
    print(f"| sequences | aggregate decode t/s (median, range) | x {sizes[0]} |")
    print("|---|---|---|")
    for b in sizes:
        med = statistics.median(tps[b])
        print(
            f"| {b} | {med:.1f} [{min(tps[b]):.1f}-{max(tps[b]):.1f}] | "
            f"{med / base:.2f}x |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "batch.json").write_text(
        json.dumps({"model": args.model, "level": args.level, "tps": tps}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
