"""The cost model against ``edgemoe bench``: predicted vs measured decode t/s.

    python benchmarks/bench_costmodel.py [--profile local.toml] [--budgets 0.75,0.5,0.3]

Measures this machine (``edgemoe profile --measure``, storage read from the
synthetic model's shard, the engine's own costs fitted on decodes of small
models) unless ``--profile`` is given, then for the
trained fixture and the synthetic OLMoE-shaped model at each budget (a
fraction of the level-8 expert bytes on top of the fixed parts at the default
context) runs ``edgemoe bench MODEL --budget B --text heldout.txt --json`` as
a user would: bench's defaults (pp128, tg64, 2 repetitions, threads tuned
while running, the default context) in a fresh process with the expert
shards dropped from the page cache (a cold start). Every configuration runs
once per pass (``--passes``, default 3); the figure compared is what bench
reports, the mean ``tg`` t/s of its repetitions, averaged over the passes,
against the cost model's prediction for the same memory plan. Both models
decode the fixture's held-out text: the cost model replays routing recorded
on text, so it predicts text, not the random ids ``bench`` uses by default.
Writes benchmarks/out/costmodel.json and prints a markdown table, the ranges
over the passes, and whether more budget ever predicts or measures slower
(measured: beyond the passes' ranges).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_offload import drop_cache  # the script's own folder is on sys.path

OUT = Path(__file__).resolve().parent / "out"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "code-mixtral"


def ensure_fixture() -> Path:
    """The fixture converted with routing samples in its manifest."""
    from edgemoe.converters.convert import ConvertOptions, convert

    out = OUT / "convert" / "fixture-costmodel"
    manifest = out / "manifest.json"
    if not manifest.exists() or '"next"' not in manifest.read_text():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(FIXTURE, out, ConvertOptions(calib_tokens=1024, force=True))
    return out


def bench(
    model: Path,
    budget: int,
    text: str | None,
    extra: tuple[str, ...] = (),
) -> dict:
    """``edgemoe bench`` in a fresh process from a cold page cache, with its
    defaults but for ``extra`` flags."""
    drop_cache(model)
    cmd = [
        sys.executable, "-m", "edgemoe", "bench", str(model), "--budget", str(budget),
        "--json", *extra,
    ]  # fmt: skip
    if text:
        cmd += ["--text", text]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=OUT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout)


def _passes(value: str) -> int:
    """--passes: a whole number of at least 1 (argparse reports the error)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return n


def measure_profile(threads: int | None, probe_file: Path):
    """``edgemoe profile --measure`` on this machine."""
    from edgemoe.commands.probe import measure

    return measure(
        OUT, threads, lambda m: print("measuring", m, flush=True), probe_file
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", help="profile name or TOML (default: measure now)")
    ap.add_argument("--budgets", default="0.75,0.5,0.3")
    ap.add_argument(
        "--threads", type=int, help="for the profile's probes (default: cores)"
    )
    ap.add_argument("--synthetic", default=str(OUT / "convert" / "edge"))
    ap.add_argument("--models", default="fixture,synthetic")
    ap.add_argument("--out", default="costmodel.json")
    ap.add_argument(
        "--passes", type=_passes, default=3, help="runs of every configuration"
    )
    ap.add_argument(
        "--bench-args",
        default="",
        help="extra flags for edgemoe bench (default: none, its defaults)",
    )
    args = ap.parse_args()

    from edgemoe.commands.probe import write_profile
    from edgemoe.format.reader import EdgeCheckpoint
    from edgemoe.profile import load_profile
    from edgemoe.runtime.costmodel import predict
    from edgemoe.runtime.dual_routing import LevelPolicy
    from edgemoe.runtime.offload import memory_plan

    synthetic = Path(args.synthetic).resolve()
    extra = tuple(args.bench_args.split())
    if args.profile:
        profile = load_profile(args.profile)
    else:
        # Storage is read from a large shard: the synthetic model's, or the
        # routed one bench_pressure.py makes.
        big = [synthetic, OUT / "pressure" / "routed" / "edge"]
        shards = [s for d in big for s in sorted(d.glob("experts-*.gguf"))]
        if not shards:
            ap.error(
                "no model shard to measure storage with in "
                f"{' or '.join(map(str, big))} (python benchmarks/bench_convert.py "
                "--layers 4 makes the first)"
            )
        profile = measure_profile(args.threads, shards[0])
        write_profile(profile, OUT / "profile-local.toml")
    print(profile.to_toml())
    wanted = args.models.split(",")
    models = [
        (name, path(), text)
        for name, path, text in (
            ("fixture", ensure_fixture, str(FIXTURE / "heldout.txt")),
            ("synthetic", lambda: synthetic, str(FIXTURE / "heldout.txt")),
        )
        if name in wanted
    ]
    configs = []  # (name, model, text, checkpoint, policy, fraction, budget)
    ckpts = []
    try:
        for name, model, text in models:
            ckpt = EdgeCheckpoint(model)
            ckpts.append(ckpt)
            n_ctx = min(ckpt.spec.n_ctx_train, 4096)  # bench's default context
            full = memory_plan(ckpt, None, n_ctx, 256, None)
            m = ckpt.manifest
            policy = LevelPolicy.make(m.plan, m.protected)
            fixed = full.backbone + full.kv_cache + full.scratch
            # What loading adds beyond the plan (measured at load): one short
            # run with every expert resident tells it, so each budget's expert
            # share is the fraction asked for.
            probe = bench(
                model, fixed + full.experts + (256 << 20), text,
                ("-p", "0", "-n", "1", "-r", "1", "-t", "1"),
            )  # fmt: skip
            runtime = probe["memory"]["runtime"]
            for frac in (float(x) for x in args.budgets.split(",")):
                budget = int(fixed + runtime + frac * full.experts)
                configs.append((name, model, text, ckpt, policy, frac, budget))
        # Passes over every configuration in turn: the host's slow spells last
        # minutes, so repeating a configuration back to back would not average
        # them out.
        runs: list[dict[str, list]] = [{} for _ in configs]
        plans = [None] * len(configs)
        for n in range(args.passes):
            for i, (name, model, text, _, _, frac, budget) in enumerate(configs):
                res = bench(model, budget, text, extra)
                plans[i] = res["memory"]
                tg = next(r for r in res["results"] if r["test"].startswith("tg"))
                # What bench reports: the mean over its repetitions, the
                # first (the cache as the prompt left it) included.
                for key in ("tps", "read_per_token", "hit_rate"):
                    runs[i].setdefault(key, []).append(tg[key])
                print(
                    f"pass {n + 1}: {name} {frac:.0%}: {tg['tps']:.1f} t/s "
                    f"(runs {', '.join(f'{x:.1f}' for x in tg['tps_runs'])})",
                    flush=True,
                )
        rows = []
        for (name, _, _, ckpt, policy, frac, budget), got, plan in zip(
            configs, runs, plans
        ):
            pred = predict(
                ckpt,
                profile,
                policy,
                tuple(plan["slots"]),
                resident=plan["resident"],
                cold=True,
            )
            mean = {k: sum(v) / len(v) for k, v in got.items()}
            rows.append(
                {
                    "model": name,
                    "fraction": frac,
                    "budget": budget,
                    "slots": plan["slots"],
                    "resident": plan["resident"],
                    "measured_tps": mean["tps"],
                    "measured_tps_passes": got["tps"],
                    "predicted_tps": pred.tokens_per_s,
                    "ratio": pred.tokens_per_s / mean["tps"],
                    "ratio_range": [
                        pred.tokens_per_s / max(got["tps"]),
                        pred.tokens_per_s / min(got["tps"]),
                    ],
                    "measured_read_per_token": mean["read_per_token"],
                    "predicted_read_per_token": pred.read_per_token,
                    "measured_hit_rate": mean["hit_rate"],
                    "predicted_hit_rate": pred.hit_rate,
                    "prediction": pred.__dict__,
                }
            )
    finally:
        for ckpt in ckpts:
            ckpt.close()
    report = {"profile": profile.to_toml(), "rows": rows}
    (OUT / args.out).write_text(json.dumps(report, indent=1))
    print()
    print(
        "| model | budget | measured t/s [passes] | predicted t/s "
        "| predicted/measured | MiB read/token (meas/pred) | hits (meas/pred) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = min(r["measured_tps_passes"]), max(r["measured_tps_passes"])
        print(
            f"| {r['model']} | {r['fraction']:.0%} ({r['budget'] / 2**20:,.0f} MiB"
            f"{', resident' if r['resident'] else ''}) "
            f"| {r['measured_tps']:.1f} [{lo:.1f}-{hi:.1f}] "
            f"| {r['predicted_tps']:.1f} | {r['ratio']:.2f}x "
            f"| {r['measured_read_per_token'] / 2**20:.2f} / "
            f"{r['predicted_read_per_token'] / 2**20:.2f} "
            f"| {r['measured_hit_rate']:.0%} / {r['predicted_hit_rate']:.0%} |"
        )
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nlargest error: {worst:.0%} (target: within 25%)")
    for line in monotonic(rows):
        print(line)
    return 0


def monotonic(rows: list[dict]) -> list[str]:
    """Per model, whether a larger budget ever predicts slower, or measures
    slower beyond noise (its passes' range entirely below the smaller
    budget's)."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = sorted(
            (r for r in rows if r["model"] == name), key=lambda r: r["budget"]
        )
        pred = [
            f"{a['fraction']:.0%}->{b['fraction']:.0%}"
            for a, b in zip(mine, mine[1:])
            if b["predicted_tps"] < a["predicted_tps"]
        ]
        meas = [
            f"{a['fraction']:.0%}->{b['fraction']:.0%}"
            for a, b in zip(mine, mine[1:])
            if max(b["measured_tps_passes"]) < min(a["measured_tps_passes"])
        ]
        out.append(
            f"{name}: more budget predicts slower: {', '.join(pred) or 'never'}; "
            f"measures slower beyond noise: {', '.join(meas) or 'never'}"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
