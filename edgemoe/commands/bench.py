"""``edgemoe bench``: llama-bench's table (prompt and generation t/s, mean ±
sd) with the expert-streaming figures beside it."""

from __future__ import annotations

import argparse
import json

from edgemoe.commands.options import add_load_args, load_model, read_text
from edgemoe.report import bench_table, threads_text


def add_parser(sub) -> None:
    bn = sub.add_parser("bench", help="prompt and generation speed (llama-bench style)")
    add_load_args(bn)
    bn.add_argument(
        "-p",
        "--n-prompt",
        type=int,
        default=128,
        help="prompt tokens per prefill test (default: 128)",
    )
    bn.add_argument(
        "-n",
        "--n-gen",
        type=int,
        default=64,
        help="tokens generated per decode test (default: 64)",
    )
    bn.add_argument(
        "-r",
        "--reps",
        type=int,
        default=2,
        help="repetitions of each test; the table shows mean ± sd (default: 2)",
    )
    bn.add_argument(
        "--text", help="UTF-8 file: evaluate its tokens instead of random ids"
    )
    bn.add_argument("--json", action="store_true", help="print one JSON object")
    bn.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from edgemoe.runtime.bench import bench

    text = read_text(args.text) if args.text else None  # fail before loading
    with load_model(args) as model:
        tokens = model.tokenize(text, add_special=False) if text else None
        from edgemoe.progress import Progress

        # Plain lines between repetitions even on a terminal: a live bar's
        # refresh thread would take CPU from the runs it times.
        progress = Progress(
            "benchmarking",
            lambda test, i, n: i / max(n, 1),
            lambda test, i, n: f"{test}, {i}/{n} tokens",
            tty=False,
        )
        results = [
            r.summary()
            for r in bench(
                model, args.n_prompt, args.n_gen, args.reps, tokens=tokens,
                progress=progress,
            )
        ]  # fmt: skip
        size = (
            sum(f.stat().st_size for f in Path(args.model).glob("*"))
            if Path(args.model).is_dir()
            else Path(args.model).stat().st_size
        )
        budget = model.memory.budget if model.memory else None
        plan = dataclasses.asdict(model.memory) if model.memory else None
        thread_use = model.device.tuner.summary()
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "bytes": size,
                    "budget": budget,
                    "memory": plan,
                    "threads": args.threads,
                    "thread_use": thread_use,
                    "results": results,
                },
                indent=1,
            )
        )
        return 0
    threads = threads_text(args.threads, thread_use)  # tuned per graph
    print(bench_table(Path(args.model).name, size, budget, threads, results))
    return 0
