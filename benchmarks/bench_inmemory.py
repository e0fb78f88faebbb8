"""In-memory baseline: EdgeMoE vs llama.cpp decode/prefill speed and peak RSS on
the same GGUF files of a realistic-size synthetic MoE (random weights).

Each measurement runs in a fresh subprocess (so peak RSS is that engine's
alone), engines interleaved run by run, so both see the same machine load.
llama.cpp runs with extra buffer types (AMX/repack) off: with them this
llama.cpp crashes on MoE GGUFs on AMX CPUs (shared/docs/engine.md).

    python benchmarks/bench_inmemory.py                 # OLMoE shape, 4 layers
    python benchmarks/bench_inmemory.py --types Q8_0 --threads 2 --runs 3

Writes benchmarks/out/inmemory.json and prints a markdown table.
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


def worker(engine: str, model: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    """One measurement in this process; returns the figures as a dict."""
    import numpy as np

    from edgemoe.runtime.metrics import peak_rss_bytes

    prompt = np.random.default_rng(0).integers(10, 5000, n_prompt).tolist()
    n_ctx = n_prompt + n_gen + 16
    t0 = time.perf_counter()
    if engine == "edgemoe":
        import edgemoe

        m = edgemoe.load(model, n_ctx=n_ctx, n_threads=threads, n_batch=512)
    else:
        from edgemoe.runtime.llamacpp import LlamaCpp

        m = LlamaCpp(model, n_ctx=n_ctx, n_threads=threads, n_batch=512)
    load_s = time.perf_counter() - t0
    # Both expose reset() and eval(tokens) -> last logits.
    m.eval(prompt[:8])  # warm-up: page the weights in, build decode graphs
    m.eval([prompt[8]])
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


def run_worker(engine: str, model: Path, threads: int, args) -> dict:
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
    ]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=OUT, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--worker", choices=("edgemoe", "llamacpp"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, args.model, int(args.threads), args.prompt, args.gen)
        print(json.dumps(res))
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for qtype in args.types.split(","):
        model = ensure_model(args.preset, args.layers, qtype)
        for threads in (int(t) for t in args.threads.split(",")):
            runs: dict[str, list[dict]] = {"edgemoe": [], "llamacpp": []}
            for _ in range(args.runs):
                for engine in ("llamacpp", "edgemoe"):
                    runs[engine].append(run_worker(engine, model, threads, args))
            med = {
                e: {
                    k: statistics.median(r[k] for r in rs)
                    for k in ("prefill_tps", "decode_tps", "peak_rss_mib", "load_s")
                }
                for e, rs in runs.items()
            }
            rows.append(
                {
                    "type": qtype,
                    "threads": threads,
                    "file_mib": model.stat().st_size / 2**20,
                    "edgemoe": med["edgemoe"],
                    "llamacpp": med["llamacpp"],
                    "decode_ratio": med["edgemoe"]["decode_tps"]
                    / med["llamacpp"]["decode_tps"],
                    "prefill_ratio": med["edgemoe"]["prefill_tps"]
                    / med["llamacpp"]["prefill_tps"],
                    "runs": runs,
                }
            )
            r = rows[-1]
            print(
                f"{qtype} T={threads}: decode {med['edgemoe']['decode_tps']:.1f} vs "
                f"{med['llamacpp']['decode_tps']:.1f} t/s ({r['decode_ratio']:.2f}x)",
                file=sys.stderr,
            )

    report = {
        "benchmark": "inmemory",
        "preset": args.preset,
        "layers": args.layers,
        "prompt": args.prompt,
        "gen": args.gen,
        "runs": args.runs,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "note": "llama.cpp with use_extra_bufts=False (AMX crash); medians of runs",
        "rows": rows,
    }
    (OUT / "inmemory.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"{report['preset']} shape, {report['layers']} layers, random weights; "
        f"{report['prompt']}-token prompt, {report['gen']} greedy tokens; "
        f"median of {report['runs']} runs",
        "",
        "| GGUF | threads | engine | prefill t/s | decode t/s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        for e, label in (("llamacpp", "llama.cpp"), ("edgemoe", "EdgeMoE")):
            m = r[e]
            lines.append(
                f"| {r['type']} ({r['file_mib']:.0f} MiB) | {r['threads']} | {label} | "
                f"{m['prefill_tps']:.1f} | {m['decode_tps']:.1f} | "
                f"{m['peak_rss_mib']:.0f} |"
            )
        lines.append(
            f"| | | **ratio** | **{r['prefill_ratio']:.2f}x** | "
            f"**{r['decode_ratio']:.2f}x** | |"
        )
    return "\n".join(lines)


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
