"""The speed-perplexity front of a converted model held in memory: every
dual-routing preset and every forced level, side by side in one run.

    python benchmarks/bench_presets.py [--model DIR] [--text FILE] [--rounds 3]
        [--threads 2] [--gen 128] [--no-ppl] [--configs "level 4,preset fast"]

Defaults to the trained fixture, converted once into benchmarks/out/convert/
fixture (levels 2,4,8, 1,024 calibration tokens). Perplexity over the text in
256-token windows (as ``edgemoe eval``); decode is ``edgemoe bench``'s tg
(one token at a time over the text), every configuration loaded once and
measured in interleaved rounds so drift hits all alike; the table gives the
median and range, the ratio to forced level 4 and the expert bytes each
decoded token computed. Writes benchmarks/out/presets.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "code-mixtral"


def converted_fixture() -> Path:
    from edgemoe.converters.convert import ConvertOptions, convert

    out = OUT / "convert" / "fixture"
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {FIXTURE.name} into {out} ...")
        convert(FIXTURE, out, ConvertOptions(calib_tokens=1024))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a converted model (default: the fixture)")
    ap.add_argument("--text", help="default: the fixture's heldout.txt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument(
        "--configs",
        help='e.g. "level 4,preset balanced" (default: all; each '
        "is held in memory at once)",
    )
    args = ap.parse_args()

    import edgemoe
    from edgemoe.runtime.bench import bench
    from edgemoe.runtime.dual_routing import QUALITY
    from edgemoe.runtime.perplexity import perplexity

    path = Path(args.model) if args.model else converted_fixture()
    text = Path(args.text) if args.text else FIXTURE / "heldout.txt"
    configs = {f"level {lv}": dict(force_level=lv) for lv in (2, 4, 8)}
    configs.update({f"preset {q}": dict(quality=q) for q in QUALITY})
    if args.configs:
        configs = {k: configs[k] for k in args.configs.split(",")}
    models = {}
    for name, opts in configs.items():
        try:
            models[name] = edgemoe.load(path, n_threads=args.threads, **opts)
        except edgemoe.errors.ConfigError as e:  # a level the model lacks
            print(f"skipping {name}: {e}")
    first = next(iter(models.values()))
    tokens = first.tokenize(text.read_text(encoding="utf-8"), add_special=False)
    rows = {name: {"tps": [], "expert_bytes": [], "ppl": None} for name in models}
    if not args.no_ppl:
        for name, m in models.items():
            rows[name]["ppl"] = perplexity(m, tokens, window=256).perplexity
            print(f"{name}: perplexity {rows[name]['ppl']:.3f}")
    n_gen = min(args.gen, first.n_ctx)
    for r in range(args.rounds):
        stream = tokens[r * n_gen :] + tokens[: r * n_gen]
        for name, m in models.items():
            (tg,) = bench(m, n_prompt=0, n_gen=n_gen, reps=1, tokens=stream)
            rows[name]["tps"].append(tg.tps[0])
            rows[name]["expert_bytes"].append(tg.expert_bytes_per_token[0])
    for m in models.values():
        m.close()
    base = statistics.median(rows["level 4"]["tps"]) if "level 4" in rows else None
    print(
        f"\n{path.name}, in memory, {args.threads} threads, tg{n_gen} over "
        f"{text.name}, {args.rounds} interleaved rounds\n"
    )
    print("| config | perplexity | decode t/s (median, range) | x level 4 ", end="")
    print("| expert KiB/token |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        med = statistics.median(row["tps"])
        ppl = f"{row['ppl']:.3f}" if row["ppl"] is not None else "-"
        ratio = f"{med / base:.2f}x" if base else "-"
        kib = statistics.median(row["expert_bytes"]) / 1024
        print(
            f"| {name} | {ppl} | {med:.1f} [{min(row['tps']):.1f}-"
            f"{max(row['tps']):.1f}] | {ratio} | {kib:.0f} |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "presets.json").write_text(
        json.dumps(
            {
                "model": str(path),
                "text": str(text),
                "threads": args.threads,
                "n_gen": n_gen,
                "rows": rows,
            },
            indent=1,
        )  # fmt: skip
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
