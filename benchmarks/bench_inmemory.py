"""In-memory baseline: EdgeMoE vs llama.cpp decode/prefill speed and peak RSS on
the same GGUF files of a realistic-size synthetic MoE (random weights).

Each measurement runs in a fresh subprocess (so peak RSS is that engine's
alone), engines interleaved run by run, so both see the same machine load.
llama.cpp runs with its defaults (extra buffer types: AMX, repacked weights);
where that crashes (Q8_0 and Q4_K MoE GGUFs on AMX CPUs, shared/docs/
engine.md) the run is repeated with them off and the table says so.

    python benchmarks/bench_inmemory.py                 # OLMoE shape, 4 layers
    python benchmarks/bench_inmemory.py --types Q8_0 --threads 2 --runs 3
    python benchmarks/bench_inmemory.py --types Q4_K --no-repack  # plain kernels

With ``--converted DIR`` it compares a converted EdgeMoE model held in memory
at each level against llama.cpp on that level exported by ``export-gguf``
(``--levels 8:Q8_0,4:Q4_K``): the same weights, each engine in its own format.
llama.cpp first runs with its defaults (AMX/repacked extra buffers); where that
crashes the run is repeated with them off and the table says so.

Writes benchmarks/out/inmemory.json (inmemory-levels.json) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def worker(
    engine: str,
    model: str,
    threads: int,
    n_prompt: int,
    n_gen: int,
    options: dict | None = None,
) -> dict:
    """One measurement in this process; returns the figures as a dict.
    ``options``: keyword arguments for ``edgemoe.load`` or ``LlamaCpp``."""
    import numpy as np

    from edgemoe.runtime.metrics import peak_rss_bytes

    prompt = np.random.default_rng(0).integers(10, 5000, n_prompt).tolist()
    n_ctx = n_prompt + n_gen + 16
    t0 = time.perf_counter()
    if engine == "edgemoe":
        import edgemoe

        m = edgemoe.load(
            model, n_ctx=n_ctx, n_threads=threads, n_batch=512, **(options or {})
        )
    else:
        from edgemoe.runtime.llamacpp import LlamaCpp

        m = LlamaCpp(
            model, n_ctx=n_ctx, n_threads=threads, n_batch=512, **(options or {})
        )
    load_s = time.perf_counter() - t0
    # Both expose reset() and eval(tokens) -> last logits. Warm-up: the whole
    # prompt pages in (nearly) every expert of a file llama.cpp maps, which
    # the page cache may have dropped since the last run; builds the graphs.
    m.eval(prompt)
    m.eval([prompt[0]])
    m.reset()
    t1 = time.perf_counter()
    logits = m.eval(prompt)
    t2 = time.perf_counter()
    for _ in range(n_gen - 1):
        logits = m.eval([int(np.argmax(logits))])
    t3 = time.perf_counter()
    return {
        "engine": engine,
        "threads": threads,
        "load_s": load_s,
        "prefill_tps": n_prompt / (t2 - t1),
        "decode_tps": (n_gen - 1) / (t3 - t2),
        "peak_rss_mib": peak_rss_bytes() / 2**20,
    }


def ensure_model(preset: str, layers: int, qtype: str) -> Path:
    from edgemoe.converters import synth

    path = OUT / "models" / f"{preset}-L{layers}-{qtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"synthesising {path.name} ...", file=sys.stderr)
        synth.write_gguf(synth.preset_config(preset, layers=layers), path, qtype)
    return path


def run_worker(
    engine: str, model: Path, threads: int, args, options: dict | None = None
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        engine,
        "--model",
        str(model),
        "--threads",
        str(threads),
        "--prompt",
        str(args.prompt),
        "--gen",
        str(args.gen),
        "--options",
        json.dumps(options or {}),
    ]
    env = dict(os.environ)
    if engine == "llamacpp":
        # libgomp's own default spin (llama.cpp sets none); EdgeMoE's workers
        # keep edgemoe.env's setting.
        env["GOMP_SPINCOUNT"] = "300000"
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=OUT, timeout=1800
    )
    if proc.returncode < 0:
        raise WorkerCrashed(f"{engine} worker killed by signal {-proc.returncode}")
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class WorkerCrashed(RuntimeError):
    """A worker died from a signal (a crash inside the engine's C code)."""


_CRASHED: set[Path] = set()  # files where llama.cpp's defaults crashed


def llamacpp_best(model: Path, threads: int, args) -> tuple[dict, str]:
    """llama.cpp with its defaults, or with extra buffers off if those crash."""
    if model not in _CRASHED:
        try:
            opts = {"extra_bufts": True}
            res = run_worker("llamacpp", model, threads, args, opts)
            return res, "its defaults (extra buffers on)"
        except WorkerCrashed as e:
            print(f"{model.name}: default llama.cpp crashed ({e})", file=sys.stderr)
            _CRASHED.add(model)
    res = run_worker("llamacpp", model, threads, args, {"extra_bufts": False})
    return res, "extra buffers off (its defaults crashed)"


def export_level(model: Path, level: int, qtype: str) -> Path:
    """``edgemoe export-gguf`` of one level, in a subprocess (peak RSS is
    inherited by children, so this process never loads a model)."""
    path = OUT / "models" / f"{model.name}-level{level}-{qtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"exporting {path.name} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "edgemoe", "export-gguf", str(model)]
        cmd += ["-o", str(path), "--level", str(level), "--type", qtype]
        subprocess.run(cmd, check=True, cwd=OUT, stdout=subprocess.DEVNULL)
    return path


def compare_levels(args) -> int:
    """Converted model in memory at each level vs llama.cpp on its export."""
    model = Path(args.converted).resolve()
    rows = []
    for spec in args.levels.split(","):
        level, qtype = int(spec.split(":")[0]), spec.split(":")[1]
        gguf_path = export_level(model, level, qtype)
        for threads in (int(t) for t in args.threads.split(",")):
            runs: dict[str, list[dict]] = {"edgemoe": [], "llamacpp": []}
            note = ""
            for _ in range(args.runs):
                res, note = llamacpp_best(gguf_path, threads, args)
                runs["llamacpp"].append(res)
                opts = {"force_level": level}
                runs["edgemoe"].append(
                    run_worker("edgemoe", model, threads, args, opts)
                )
            row = _row(runs, f"level {level} / {qtype}", threads, gguf_path)
            row["note"] = note
            # The same tokens at different bits: compare bytes x tokens/s.
            row["bytes_per_token"] = {
                "edgemoe": touched_bytes(model, level),
                "llamacpp": touched_bytes(gguf_path),
            }
            rows.append(row)
    report = {
        "benchmark": "inmemory-levels",
        "model": str(model),
        "prompt": args.prompt,
        "gen": args.gen,
        "runs": args.runs,
        "machine": _machine(),
        "rows": rows,
    }
    (OUT / "inmemory-levels.json").write_text(json.dumps(report, indent=1))
    print(markdown(report, f"{model.name} (converted)"))
    return 0


def touched_bytes(path: Path, level: int | None = None) -> float:
    """Weight bytes a decode token reads, with routing spread evenly: every
    backbone matrix (the token embedding only if it is also the head: else
    one row), and n_used / n_expert of the routed experts' bytes (for a
    converted model at ``level``, its protected experts at the top one)."""
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.runtime.costmodel import token_tensors
    from edgemoe.runtime.offload import plane_bytes

    ckpt = open_checkpoint(path)
    try:
        spec = ckpt.spec
        share = spec.n_expert_used / spec.n_expert
        total = 0.0
        for name, _, _, n in token_tensors(ckpt):
            total += n * (share if "_exps." in name else 1)
        if level is not None:  # a converted model: experts are planes
            m = ckpt.manifest
            planes = plane_bytes(ckpt)
            at_level = sum(planes[: m.plan.n_planes(level)])
            for layer in m.moe_layers:
                top = len(m.protected[layer])
                mean = (at_level * (spec.n_expert - top) + sum(planes) * top) / (
                    spec.n_expert
                )
                total += spec.n_expert_used * mean
        return total
    finally:
        ckpt.close()


def _row(runs: dict, label: str, threads: int, model: Path) -> dict:
    """Medians per engine and the EdgeMoE / llama.cpp ratios."""
    med = {
        e: {
            k: statistics.median(r[k] for r in rs)
            for k in ("prefill_tps", "decode_tps", "peak_rss_mib", "load_s")
        }
        for e, rs in runs.items()
    }
    row = {
        "type": label,
        "threads": threads,
        "file_mib": model.stat().st_size / 2**20,
        "edgemoe": med["edgemoe"],
        "llamacpp": med["llamacpp"],
        "decode_ratio": med["edgemoe"]["decode_tps"] / med["llamacpp"]["decode_tps"],
        "prefill_ratio": med["edgemoe"]["prefill_tps"] / med["llamacpp"]["prefill_tps"],
        "runs": runs,
    }
    print(
        f"{label} T={threads}: decode {med['edgemoe']['decode_tps']:.1f} vs "
        f"{med['llamacpp']['decode_tps']:.1f} t/s ({row['decode_ratio']:.2f}x)",
        file=sys.stderr,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--converted", help="converted model: compare its levels")
    ap.add_argument("--levels", default="8:Q8_0,4:Q4_K")
    ap.add_argument(
        "--no-repack", action="store_true", help="EdgeMoE with repack=False"
    )
    ap.add_argument("--worker", choices=("edgemoe", "llamacpp"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(
            args.worker,
            args.model,
            int(args.threads),
            args.prompt,
            args.gen,
            json.loads(args.options),
        )
        print(json.dumps(res))
        return 0
    if args.converted:
        return compare_levels(args)

    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for qtype in args.types.split(","):
        model = ensure_model(args.preset, args.layers, qtype)
        for threads in (int(t) for t in args.threads.split(",")):
            runs: dict[str, list[dict]] = {"edgemoe": [], "llamacpp": []}
            note = ""
            for _ in range(args.runs):
                res, note = llamacpp_best(model, threads, args)
                runs["llamacpp"].append(res)
                opts = {"repack": False} if args.no_repack else None
                runs["edgemoe"].append(
                    run_worker("edgemoe", model, threads, args, opts)
                )
            rows.append(dict(_row(runs, qtype, threads, model), note=note))

    report = {
        "benchmark": "inmemory",
        "preset": args.preset,
        "layers": args.layers,
        "prompt": args.prompt,
        "gen": args.gen,
        "runs": args.runs,
        "repack": not args.no_repack,
        "machine": _machine(),
        "rows": rows,
    }
    (OUT / "inmemory.json").write_text(json.dumps(report, indent=1))
    print(markdown(report, f"{report['preset']} shape, {report['layers']} layers"))
    return 0


def markdown(report: dict, model: str) -> str:
    lines = [
        f"{model}, random weights; "
        f"{report['prompt']}-token prompt, {report['gen']} greedy tokens; "
        f"median of {report['runs']} runs [range]",
        "",
        "| GGUF | threads | engine | prefill t/s | decode t/s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]

    def spread(r: dict, e: str, key: str) -> str:
        runs = [x[key] for x in r["runs"][e]]
        return f"{r[e][key]:.1f} [{min(runs):.1f}-{max(runs):.1f}]"

    ours = "EdgeMoE" if report.get("repack", True) else "EdgeMoE, repack=False"
    for r in report["rows"]:
        for e, label in (("llamacpp", "llama.cpp"), ("edgemoe", ours)):
            lines.append(
                f"| {r['type']} ({r['file_mib']:.0f} MiB) | {r['threads']} | {label} | "
                f"{spread(r, e, 'prefill_tps')} | {spread(r, e, 'decode_tps')} | "
                f"{r[e]['peak_rss_mib']:.0f} |"
            )
        lines.append(
            f"| | | **ratio** | **{r['prefill_ratio']:.2f}x** | "
            f"**{r['decode_ratio']:.2f}x** | |"
        )
    if any("bytes_per_token" in r for r in report["rows"]):
        lines += [
            "",
            "Effective weight bandwidth (weight bytes a decode token reads, "
            "routing spread evenly, x decode t/s):",
            "",
            "| level | threads | engine | MiB per token | GB/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["rows"]:
            bw = {
                e: r["bytes_per_token"][e] * r[e]["decode_tps"] / 1e9
                for e in ("llamacpp", "edgemoe")
            }
            for e, label in (("llamacpp", "llama.cpp"), ("edgemoe", "EdgeMoE")):
                ratio = f"**{bw[e] / bw['llamacpp']:.2f}x**" if e == "edgemoe" else ""
                lines.append(
                    f"| {r['type']} | {r['threads']} | {label} | "
                    f"{r['bytes_per_token'][e] / 2**20:.1f} | {bw[e]:.2f} | {ratio} |"
                )
    by_note: dict[str, list[str]] = {}
    for r in report["rows"]:
        if r.get("note"):
            by_note.setdefault(r["note"], []).append(f"{r['type']} T={r['threads']}")
    lines.append("")
    for note, where in by_note.items():
        lines.append(f"llama.cpp with {note}: {', '.join(where)}.")
    return "\n".join(lines)


def _machine() -> dict:
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
