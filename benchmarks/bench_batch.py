"""Batched decode: aggregate tokens/s of B sequences decoded together (one
graph per step over the next token of each) against one sequence alone.

    python benchmarks/bench_batch.py MODEL [--seqs 1,2,4,8] [--prompt 64]
        [--gen 32] [--runs 3] [--threads 2] [--level L] [--llama]

One model, loaded once with room for every sequence; per run and batch size,
B fresh sequences are prefilled with different random prompts (one step) and
then decoded ``--gen`` steps with greedy tokens; batch sizes interleave run
by run. Prints the median aggregate decode t/s, its range and the ratio to
B = 1; writes benchmarks/out/batch.json.

With ``--llama`` (a GGUF MODEL) llama.cpp decodes the same batches on the
same file in the same process, interleaved with EdgeMoE run by run: its
defaults (float16 cache, flash attention, one cache stream per sequence)
except the extra buffer types, which crash MoE GGUFs on AMX CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
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


def run_batch_llama(ref, b: int, n_prompt: int, n_gen: int, seed: int) -> float:
    """``run_batch`` on llama.cpp: sequence ids 0..b-1, a fresh cache."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hi = min(ref.n_vocab, 5000)
    ref.reset()
    prompts = [rng.integers(10, hi, n_prompt).tolist() for _ in range(b)]
    logits = ref.decode_batch([(i, 0, p) for i, p in enumerate(prompts)])
    t0 = time.perf_counter()
    for k in range(n_gen):
        logits = ref.decode_batch(
            [(i, n_prompt + k, [int(np.argmax(row))]) for i, row in enumerate(logits)]
        )
    return b * n_gen / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--seqs", default="1,2,4,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--level", type=int, help="a converted model's forced level")
    ap.add_argument("--llama", action="store_true", help="llama.cpp side by side")
    args = ap.parse_args()

    import edgemoe

    sizes = [int(x) for x in args.seqs.split(",")]
    n_ctx = max(sizes) * (args.prompt + args.gen + 1)
    engines = {"EdgeMoE": run_batch}
    tps = {"EdgeMoE": {b: [] for b in sizes}}
    models = {}
    with contextlib.ExitStack() as stack:
        models["EdgeMoE"] = stack.enter_context(
            edgemoe.load(
                args.model, n_ctx=n_ctx, n_threads=args.threads, force_level=args.level
            )
        )
        if args.llama:
            from edgemoe.runtime.llamacpp import LlamaCpp

            models["llama.cpp"] = stack.enter_context(
                LlamaCpp(
                    args.model, n_ctx=n_ctx, n_threads=args.threads,
                    n_seq_max=max(sizes),
                )
            )  # fmt: skip
            engines["llama.cpp"] = run_batch_llama
            tps["llama.cpp"] = {b: [] for b in sizes}
        for name, fn in engines.items():
            fn(models[name], 1, 8, 2, seed=99)  # warm-up: graphs, pages
        for r in range(args.runs):
            for b in sizes:
                for name, fn in engines.items():
                    tps[name][b].append(fn(models[name], b, args.prompt, args.gen, r))
    at = f", level {args.level}" if args.level else ""
    print(
        f"\n{Path(args.model).name}{at}, {args.threads} threads, {args.prompt}-token "
        f"prompts, {args.gen} decode steps, {args.runs} runs\n"
    )
    names = list(engines)
    head = " | ".join(f"{n} t/s (median, range) | x {sizes[0]}" for n in names)
    print(f"| sequences | {head} |" + (" EdgeMoE / llama.cpp |" if args.llama else ""))
    print("|---|" + "---|---|" * len(names) + ("---|" if args.llama else ""))
    for b in sizes:
        cells = []
        for n in names:
            med = statistics.median(tps[n][b])
            base = statistics.median(tps[n][sizes[0]])
            lo, hi = min(tps[n][b]), max(tps[n][b])
            cells.append(f"{med:.1f} [{lo:.1f}-{hi:.1f}] | {med / base:.2f}x")
        ratio = ""
        if args.llama:
            e, ll = (statistics.median(tps[n][b]) for n in ("EdgeMoE", "llama.cpp"))
            ratio = f" {e / ll:.2f}x |"
        print(f"| {b} | " + " | ".join(cells) + " |" + ratio)
    OUT.mkdir(exist_ok=True)
    (OUT / "batch.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "level": args.level,
                "threads": args.threads,
                "tps": tps,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
