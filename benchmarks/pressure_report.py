"""Tables for bench_pressure.py's JSON: one run's file, or several merged
(e.g. a limit re-run on its own after an interrupted run).

    python benchmarks/pressure_report.py benchmarks/out/pressure-routed.json \
        benchmarks/out/pressure-routed-20.json [--engines edgemoe,llama-mmap:q4km]

Rows are grouped by (limit fraction, engine); each group's median decode
speed with its range, and ratios to llama.cpp's best and default
configurations at that limit.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def failure(returncode: int, oom_kills: int, timed_out: bool, last_line: str) -> str:
    """A failed run's status: OOM-killed, timeout, crashed (a signal, as
    llama.cpp's defaults segfault on AMX CPUs) or the error's last line."""
    if oom_kills:
        return "OOM-killed"
    if timed_out:
        return "timeout"
    if returncode < 0:
        return f"crashed (signal {-returncode})"
    return f"failed ({returncode}): {last_line[:160]}"


def status(row: dict) -> str:
    """``row``'s status; older files wrote a crash as "failed (-N): "."""
    s = row["status"]
    if s.startswith("failed (-"):
        return f"crashed (signal {s[len('failed (-') :].split(')')[0]})"
    return s


def progress(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['fraction']:.0%} {row['engine']}: {status(row)}"
    return (
        f"{row['fraction']:.0%} {row['engine']}: {row['decode_tps']:.2f} t/s, "
        f"TTFT {row['ttft_s']:.2f} s, peak {row['peak_cgroup'] / 2**20:,.0f} MiB, "
        f"read {row['read_bytes'] / 2**20:,.0f} MiB"
    )


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return {"status": status(rows[0]) if rows else "-", "n": len(rows)}
    tps = [r["decode_tps"] for r in ok]
    return {
        "status": "ok" if len(ok) == len(rows) else f"{len(rows) - len(ok)} failed",
        "n": len(rows),
        "tps": statistics.median(tps),
        "lo": min(tps),
        "hi": max(tps),
        "ttft": statistics.median(r["ttft_s"] for r in ok),
        "peak": max(r["peak_cgroup"] for r in ok),
        "faults": statistics.median(r["major_faults"] for r in ok),
        "read": statistics.median(r["read_bytes"] for r in ok),
        "oom": sum(r["oom_kills"] for r in rows),
        # EdgeMoE's own counter: time decode steps waited on expert reads.
        "stall": statistics.median(
            [r["decode_stall_s"] / r["decode_s"] for r in ok if "decode_stall_s" in r]
            or [float("nan")]
        ),
    }


def merge(reports: list[dict]) -> dict:
    """One report from several runs of the same model and protocol."""
    first = reports[0]
    for r in reports[1:]:
        for key in ("model", "busy", "gguf_bytes", "prompt", "gen"):
            if r[key] != first[key]:
                raise ValueError(f"cannot merge: {key} {r[key]!r} != {first[key]!r}")
    out = dict(first, rows=[row for r in reports for row in r["rows"]])
    out["baseline_bytes"] = statistics.median(r["baseline_bytes"] for r in reports)
    out["routing"] = next((r["routing"] for r in reports if r.get("routing")), None)
    return out


def markdown(report: dict) -> str:
    gib = report["gguf_bytes"] / 2**30
    busy = ", with a CPU-bound process running" if report.get("busy") else ""
    lines = [
        f"model {report['model']}{busy}; limit = fraction x Q4_K_M GGUF "
        f"({gib:.2f} GiB) + baseline ({report['baseline_bytes'] / 2**20:,.0f} "
        f"MiB); prompt {report['prompt']}, decode {report['gen']} tokens; median "
        "of n runs [range]",
        "",
        "| limit | engine | n | decode t/s [range] | x llama.cpp best | x llama.cpp "
        "defaults | x streamer | stall | TTFT s | peak MiB | major faults | "
        "read MiB | OOM kills |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["rows"]
    for frac in sorted({r["fraction"] for r in rows}, reverse=True):
        group = [r for r in rows if r["fraction"] == frac]
        names = list(dict.fromkeys(r["engine"] for r in group))
        summ = {n: summary([r for r in group if r["engine"] == n]) for n in names}
        llama = [
            s["tps"] for n, s in summ.items() if n.startswith("llama") and "tps" in s
        ]
        best = max(llama) if llama else None
        default = summ.get("llama-default:q4km", {})
        streamer = summ.get("bigmoe:q4km", {})
        limit = statistics.median(r["limit"] for r in group) / 2**20
        for n in names:
            s = summ[n]
            head = f"| {frac:.0%} ({limit:,.0f} MiB) | {n} | {s['n']} |"
            if "tps" not in s:
                lines.append(f"{head} {s['status']} | | | | | | | | | |")
                continue
            is_edge = n.startswith("edgemoe")
            r_best = f"{s['tps'] / best:.2f}x" if is_edge and best else ""
            r_def = ""
            if is_edge and "tps" in default:
                r_def = f"{s['tps'] / default['tps']:.2f}x"
            elif is_edge and default:
                r_def = f"(llama.cpp {default['status']})"
            r_str = ""
            if is_edge and "tps" in streamer:
                r_str = f"{s['tps'] / streamer['tps']:.2f}x"
            note = "" if s["status"] == "ok" else f" ({s['status']})"
            stall = "" if s["stall"] != s["stall"] else f"{s['stall']:.0%}"
            lines.append(
                f"{head} {s['tps']:.2f}{note} [{s['lo']:.2f}-{s['hi']:.2f}] | "
                f"{r_best} | {r_def} | {r_str} | {stall} | {s['ttft']:.2f} | "
                f"{s['peak'] / 2**20:,.0f} | "
                f"{s['faults']:,.0f} | {s['read'] / 2**20:,.0f} | {s['oom']} |"
            )
    return "\n".join(lines)


def threads_table(report: dict) -> str:
    """EdgeMoE's default (tuned threads) against fixed thread counts, one row
    per limit: is the default within reach of its best setting?"""
    names = ["edgemoe", "edgemoe-t1", "edgemoe-t2"]
    busy = "with a CPU-bound process running" if report.get("busy") else "quiet"
    lines = [
        f"model {report['model']}, {busy}; decode t/s, median of n runs [range]",
        "",
        "| limit | default (tuned) | -t 1 | -t 2 | default / best fixed |",
        "|---|---|---|---|---|",
    ]
    rows = report["rows"]
    for frac in sorted({r["fraction"] for r in rows}, reverse=True):
        group = [r for r in rows if r["fraction"] == frac]
        summ = {n: summary([r for r in group if r["engine"] == n]) for n in names}
        cells = []
        for n in names:
            s = summ[n]
            cells.append(
                f"{s['tps']:.2f} [{s['lo']:.2f}-{s['hi']:.2f}] (n={s['n']})"
                if "tps" in s
                else s["status"]
            )
        fixed = [summ[n]["tps"] for n in names[1:] if "tps" in summ[n]]
        ratio = ""
        if fixed and "tps" in summ["edgemoe"]:
            ratio = f"{summ['edgemoe']['tps'] / max(fixed):.2f}x"
        lines.append(f"| {frac:.0%} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", metavar="REPORT.json")
    ap.add_argument("--engines", help="only these engines' rows (comma-separated)")
    ap.add_argument(
        "--threads",
        action="store_true",
        help="EdgeMoE's default against -t 1 and -t 2, one row per limit",
    )
    args = ap.parse_args(argv)
    try:
        report = merge([json.loads(Path(p).read_text()) for p in args.reports])
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.engines:
        keep = set(args.engines.split(","))
        report["rows"] = [r for r in report["rows"] if r["engine"] in keep]
    if args.threads:
        print(threads_table(report))
        return 0
    print(markdown(report))
    if report.get("routing"):
        from types import SimpleNamespace

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from edgemoe.locality import markdown as routing_md

        def layer(x: dict) -> SimpleNamespace:
            hits = {float(k): v for k, v in x["lru_hits"].items()}
            return SimpleNamespace(**(x | {"lru_hits": hits}))

        n_expert = report.get("n_expert")
        if n_expert is None:  # files written before it was recorded
            manifest = Path(report["files"]["edge"]) / "manifest.json"
            n_expert = json.loads(manifest.read_text())["spec"]["n_expert"]
        layers = [layer(x) for x in report["routing"]]
        print()
        print(routing_md(layers, n_expert))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
