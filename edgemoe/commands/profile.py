"""``edgemoe profile``: list, detect or measure device profiles, and plan a
converted model on one (runtime/planner.py). The ``--profile``/``--emulate``
load options are in ``options``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from edgemoe.errors import ConfigError
from edgemoe.units import budget_flag, mib_up
from edgemoe.units import mib as _mib


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="detect or measure this device and plan a model on it"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="profile name, path to a .toml, or auto (default: detect this machine)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="measure this machine and write a profile (default: the user 'local' one)",
    )
    p.add_argument("-o", "--output", help="where --measure writes its TOML")
    p.add_argument(
        "--probe-dir",
        help="--measure: directory for the storage probe file (default: the "
        "model's directory with -m, else the output's)",
    )
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="--measure: compute threads (default: this machine's cores)",
    )
    p.add_argument("-m", "--model", help="converted model to plan on the device")
    p.add_argument(
        "-c", "--ctx", type=int, default=0, help="context (default: min(model's, 4096))"
    )
    p.add_argument("--list", action="store_true", help="list the known profiles")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from edgemoe.profile import load_profile, profile_names, user_dir

    if args.list:
        for name in profile_names():
            prof = load_profile(name)
            kind = "measured" if prof.measured else "datasheet/estimates"
            print(
                f"{name:20s} {_mib(prof.memory_usable):>11s} usable  {kind:20s} "
                f"{prof.description}"
            )
        return 0
    if args.model and not (Path(args.model) / "manifest.json").is_file():
        raise ConfigError(
            f"{args.model}: not a converted model (no manifest.json); plans are "
            "for models written by edgemoe convert"
        )
    detected = None
    if args.measure:
        from edgemoe.commands.probe import measure, write_profile

        out = Path(args.output) if args.output else user_dir() / "local.toml"
        probe_file = None
        if args.probe_dir:
            probe_dir = Path(args.probe_dir)
        elif args.model:
            shards = sorted(Path(args.model).glob("experts-*.gguf"))
            probe_file = max(shards, key=lambda f: f.stat().st_size, default=None)
            probe_dir = Path(args.model)
        else:
            probe_dir = out.parent
        prof = measure(
            probe_dir,
            args.threads,
            lambda msg: print(f"measuring {msg} ...", file=sys.stderr),
            probe_file
            if probe_file and probe_file.stat().st_size >= 16 << 20
            else None,
        )
        write_profile(prof, out)
        print(f"wrote {out}", file=sys.stderr)
    elif args.device == "auto":
        from edgemoe.commands.probe import auto_profile

        prof, detected = auto_profile()
    else:
        prof = load_profile(args.device)
    plan = None
    if args.model:
        from edgemoe.format.reader import EdgeCheckpoint
        from edgemoe.runtime.planner import plan_model

        ckpt = EdgeCheckpoint(Path(args.model))
        try:
            plan = plan_model(ckpt, prof, n_ctx=args.ctx)
        finally:
            ckpt.close()
    if args.json:
        out = {"profile": _profile_dict(prof)}
        if detected is not None:
            out["detected"] = {
                "profile": detected.profile,
                "model": detected.model,
                **dict(detected.facts),
            }
        if plan is not None:
            out["plan"] = _plan_dict(plan)
        print(json.dumps(out, indent=1))
        return 0
    _print_profile(prof, detected)
    if plan is not None:
        _print_plan(plan)
    return 0


def _profile_dict(prof) -> dict:
    d = dataclasses.asdict(prof)
    d["matmul"] = dict(prof.matmul)
    return d


def _plan_dict(plan) -> dict:
    rec = plan.recommended
    return {
        "model": plan.model,
        "n_ctx": plan.n_ctx,
        "min_budget_bytes": plan.min_budget,
        "full_budget_bytes": plan.full_budget,
        "rows": [
            {
                "budget": r.budget,
                "policy": r.policy,
                "slots": list(r.slots),
                "peak_bytes": r.peak_bytes,
                "fits": r.fits,
                **dataclasses.asdict(r.prediction),
            }
            for r in plan.rows
        ],
        "recommended": None
        if rec is None
        else {"budget": rec.budget, "policy": rec.policy},
    }


def _print_profile(prof, detected) -> None:
    src = "measured" if prof.measured else "datasheet figures and estimates"
    print(f"device: {prof.name} — {prof.description} ({src})")
    if detected is not None:
        facts = "".join(f", {k}: {v}" for k, v in detected.facts)
        print(f"detected: {detected.model or 'unknown'} -> {detected.profile}{facts}")
    print(
        f"memory: {_mib(prof.memory_total)} total, {_mib(prof.memory_usable)} usable, "
        f"{prof.memory_bandwidth:.1f} GB/s · storage: "
        f"{prof.storage_seq_read:,.0f} MB/s sequential, "
        f"{prof.storage_rand_read:,.0f} MB/s 2 MiB random, "
        f"{prof.storage_latency_ms:.2f} ms latency"
    )
    rates = ", ".join(f"{k.upper()} {v:.1f}" for k, v in prof.matmul.items())
    print(
        f"compute: {prof.backend}, {prof.threads} threads · matvec GB/s: {rates} · "
        f"overhead {prof.token_overhead_ms:.2f} ms/token + "
        f"{prof.layer_overhead_ms:.2f} ms/layer + {prof.plane_overhead_ms:.3f} ms/plane"
    )
    marked = [*prof.datasheet, *prof.estimated]
    if marked:
        print(f"not measured: {', '.join(marked)}")
    for note in prof.notes:
        print(f"  - {note}")


def _print_plan(plan) -> None:
    print()
    print(
        f"plan for {plan.model} at a {plan.n_ctx}-token context: minimum budget "
        f"{mib_up(plan.min_budget)} ({plan.min_budget} bytes), every expert "
        f"resident from {mib_up(plan.full_budget)}"
    )
    print(
        "| budget | policy | expert slots/plane | peak memory | fits | predicted t/s "
        "| MiB read/token | plane hits | bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in plan.rows:
        p = r.prediction
        mark = " *" if r is plan.recommended else ""
        print(
            f"| {mib_up(r.budget)}{mark} | {r.policy} | {'/'.join(map(str, r.slots))} "
            f"| {_mib(r.peak_bytes)} | {'yes' if r.fits else 'no'} "
            f"| {p.tokens_per_s:.1f} | {p.read_per_token / 2**20:.1f} "
            f"| {p.hit_rate:.0%} | {p.bound} |"
        )
    rec = plan.recommended
    if rec is None:
        print(
            f"\ndoes not fit: the minimum budget is {mib_up(plan.min_budget)}, the "
            f"device has {_mib(plan.profile.memory_usable)} usable"
        )
    else:
        print(
            f"\nrecommended (*): {budget_flag(rec.budget)} "
            f"--quality {rec.policy} "
            f"(~{rec.prediction.tokens_per_s:.1f} t/s predicted, decode)"
        )
