"""Is EdgeMoE's default speed stable, quiet or busy? ``edgemoe bench`` with
the defaults a user gets against fixed thread and spin settings, on a quiet
machine and with a competing CPU-bound process.

    python benchmarks/bench_stability.py MODEL [--budget 1GiB] [--level 4] [--runs 5]

For each condition (``quiet``; ``busy``: one other process spinning on a
core for the whole run) and each setting, ``--runs`` fresh processes run
``edgemoe bench MODEL -p 0 -n N -r 1 --json``, settings interleaved run by
run. Settings: ``default`` (no option, no environment variable), ``t1`` and
``t2`` (``-t 1``, ``-t 2``), and each with ``+spin0`` (``GOMP_SPINCOUNT=0``:
OpenMP workers sleep at once between graphs). Prints per condition and
setting the median decode t/s, the range and the spread (half the range over
the median), and the default's ratio to each setting; writes
benchmarks/out/stability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

SETTINGS = {
    "default": ([], {}),
    "t1": (["-t", "1"], {}),
    "t2": (["-t", "2"], {}),
    "default+spin0": ([], {"GOMP_SPINCOUNT": "0"}),
    "t1+spin0": (["-t", "1"], {"GOMP_SPINCOUNT": "0"}),
    "t2+spin0": (["-t", "2"], {"GOMP_SPINCOUNT": "0"}),
}
SPIN = "import time\nend = time.time() + 7200\nwhile time.time() < end:\n    pass\n"


def bench_once(args, extra: list[str], env_extra: dict) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "edgemoe", "bench", args.model, "-p", "0"]
    cmd += ["-n", str(args.gen), "-r", "1", "--json", *extra]
    if args.budget:
        cmd += ["--budget", args.budget]
    if args.level:
        cmd += ["--level", str(args.level)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    report = json.loads(proc.stdout)
    return next(r["tps"] for r in report["results"] if r["test"].startswith("tg"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--budget")
    ap.add_argument("--level", type=int)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--conditions", default="quiet,busy")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default="stability.json")
    args = ap.parse_args()
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "budget": args.budget,
        "level": args.level,
        "gen": args.gen,
        "rows": [],
    }
    for cond in args.conditions.split(","):
        spinner = None
        if cond == "busy":
            spinner = subprocess.Popen([sys.executable, "-c", SPIN])
        try:
            runs: dict[str, list[float]] = {s: [] for s in settings}
            for _ in range(args.runs):
                for s in settings:
                    extra, env = SETTINGS[s]
                    runs[s].append(bench_once(args, extra, env))
                    print(f"{cond} {s}: {runs[s][-1]:.1f} t/s", file=sys.stderr)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        for s, tps in runs.items():
            report["rows"].append({"condition": cond, "setting": s, "tps": tps})
        (OUT / args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"`{Path(report['model']).name}`, budget {report['budget'] or 'none'}, "
        f"level {report.get('level') or 'dual routing'}, tg{report['gen']}, "
        "one fresh process per run",
        "",
        "| condition | setting | median t/s | range | spread | default / this |",
        "|---|---|---|---|---|---|",
    ]
    for cond in dict.fromkeys(r["condition"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["condition"] == cond]
        med = {r["setting"]: statistics.median(r["tps"]) for r in rows}
        default = med.get("default")
        for r in rows:
            m, lo, hi = med[r["setting"]], min(r["tps"]), max(r["tps"])
            ratio = f"{default / m:.2f}x" if default else ""
            lines.append(
                f"| {cond} | {r['setting']} | {m:.1f} | {lo:.1f}-{hi:.1f} | "
                f"±{(hi - lo) / 2 / m:.0%} | {ratio} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
