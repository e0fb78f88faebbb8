"""Offloading benchmark: EdgeMoE under memory budgets against on-demand
baselines, with each run's physical limit measured on the same machine.

    python benchmarks/bench_offload.py [--model DIR] [--budgets 0.75,0.5,0.3]
    python benchmarks/bench_offload.py --model fixture \
        --text ../shared/fixtures/code-mixtral/heldout.txt --ppl

MODEL is a converted model (default: the OLMoE-shaped one bench_convert.py
writes; run that first), or ``fixture``: the trained fixture, converted into
benchmarks/out/convert/fixture where missing. A budget is a fraction of the
level-8 expert bytes, in slots on top of backbone, KV cache, scratch and 32
MiB for the runtime. For each budget it runs, each in a fresh process with
the expert shards dropped from the page cache:

- ``lru-8``: on-demand loading, LRU eviction, no prefetch, every expert at
  8 bits (each layer waits for its reads)
- ``lru-4``: the same at 4 bits
- ``level-4``: EdgeMoE's defaults with every expert forced to 4 bits
- ``hebf``: HEBF + dual routing (balanced), no prefetch
- ``full``: EdgeMoE's defaults: HEBF + dual routing + next-layer prefetch

Decode is llama-bench's tg: one token at a time, random ids (or the tokens
of --text). It reports tokens/s, stall fraction, bytes read per token, hit
rate, peak RSS and (--ppl) perplexity over --text, and each run as a
fraction of its physical limit: the larger of bytes touched per token /
memory bandwidth and bytes read per token / cold disk bandwidth, both
measured here. Writes benchmarks/out/offload.json (or --out); prints markdown.
In-memory levels against llama.cpp: bench_inmemory.py --converted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

CONFIGS = {
    "lru-8": dict(force_level=8, eviction="lru", prefetch=False),
    "lru-4": dict(force_level=4, eviction="lru", prefetch=False),
    "level-4": dict(force_level=4),
    "hebf": dict(quality="balanced", prefetch=False),
    "full": dict(quality="balanced", prefetch=True),
}


def drop_cache(model: Path) -> None:
    """Evict the model's expert shards from the page cache (cold reads)."""
    from edgemoe.runtime.io_queue import drop_cached

    for f in model.glob("experts-*.gguf"):
        drop_cached(f)


def worker(args) -> dict:
    import edgemoe
    from edgemoe.runtime.bench import bench
    from edgemoe.runtime.metrics import peak_rss_bytes

    opts = json.loads(args.options)
    drop_cache(Path(args.model))
    m = edgemoe.load(args.model, n_ctx=_n_ctx(args), n_threads=args.threads, **opts)
    if args.probe:
        return {"runtime": m.memory.runtime}
    tokens = None
    if args.text:
        tokens = m.tokenize(Path(args.text).read_text(), add_special=False)
    pp, tg = (r.summary() for r in bench(m, args.prompt, args.gen, 1, tokens=tokens))
    ppl = None
    if args.ppl:
        from edgemoe.runtime.perplexity import perplexity

        ppl = perplexity(m, tokens, min(256, m.n_ctx)).perplexity
    return {
        "perplexity": ppl,
        "prefill_tps": pp["tps"],
        "decode_tps": tg["tps"],
        "stall_fraction": tg["stall_fraction"],
        "read_per_token": tg["read_per_token"],
        "touched_per_token": _dense_bytes(m) + tg["expert_bytes_per_token"],
        "hit_rate": tg["hit_rate"],
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "slots": list(m.memory.slots) if m.memory else None,
        "plan_mib": m.memory.total / 2**20 if m.memory else None,
    }


def _n_ctx(args) -> int:
    return max(args.prompt, args.gen, 256 if args.ppl else 0) + 8


def _dense_bytes(m) -> int:
    """Backbone weight bytes one decode token reads: all of it but the token
    embedding table, of which it reads one row."""
    embd = m.checkpoint.info("token_embd.weight")[2]
    return m.checkpoint.manifest.backbone.bytes - embd


def measure_bandwidth(model: Path) -> dict:
    """Memory copy bandwidth and cold O_DIRECT read bandwidth, measured here."""
    import numpy as np

    from edgemoe.checkpoint.base import aligned_empty

    a = np.ones(64 << 20, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    t = time.perf_counter()
    for _ in range(4):
        np.copyto(b, a)
    mem = 4 * 2 * a.nbytes / (time.perf_counter() - t)  # read + write
    shard = sorted(model.glob("experts-*.gguf"))[0]
    drop_cache(model)
    size = min(shard.stat().st_size // 4096 * 4096, 512 << 20)
    buf = aligned_empty((8 << 20,), np.uint8, 4096)
    fd = os.open(shard, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        t = time.perf_counter()
        done = 0
        while done < size:
            done += os.preadv(fd, [memoryview(buf)], done)
        disk = done / (time.perf_counter() - t)
    finally:
        os.close(fd)
    return {"memory_bytes_s": mem, "disk_bytes_s": disk}


def run(args, options: dict, probe: bool = False) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        str(args.model),
        "--options",
        json.dumps(options),
        "--threads",
        str(args.threads),
        "--prompt",
        str(args.prompt),
        "--gen",
        str(args.gen),
        *(["--text", str(Path(args.text).resolve())] if args.text else []),
        *(["--ppl"] if args.ppl else []),
        *(["--probe"] if probe else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=OUT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _model(ap, name: str) -> Path:
    """A converted model's directory; ``fixture`` converts the fixture."""
    if name == "fixture":
        from edgemoe.converters.convert import ConvertOptions, convert

        path = OUT / "convert" / "fixture"
        if not (path / "manifest.json").exists():
            fixture = HERE.parents[1] / "shared" / "fixtures" / "code-mixtral"
            path.parent.mkdir(parents=True, exist_ok=True)
            convert(fixture, path, ConvertOptions(force=True))
        return path
    path = Path(name).resolve()
    if not (path / "manifest.json").exists():
        ap.error(
            f"{path}: no converted model (make the default one with "
            "python benchmarks/bench_convert.py --layers 4, or pass --model fixture)"
        )
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(OUT / "convert" / "edge"))
    ap.add_argument("--budgets", default="0.75,0.5,0.3")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="offload.json", help="JSON file in benchmarks/out")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--text", help="evaluate this text's tokens (default random)")
    ap.add_argument(
        "--ppl", action="store_true", help="also report perplexity over --text"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = _model(ap, args.model)
    if args.worker or args.probe:
        print(json.dumps(worker(args)))
        return 0

    from edgemoe.format.reader import EdgeCheckpoint
    from edgemoe.runtime.offload import memory_plan

    OUT.mkdir(parents=True, exist_ok=True)
    bw = measure_bandwidth(args.model)
    # Never load the model here: children inherit this process's peak RSS.
    ckpt = EdgeCheckpoint(args.model)
    try:
        level8 = ckpt.level_bytes()[max(ckpt.manifest.levels)]
        base = memory_plan(ckpt, None, _n_ctx(args), 256, None)
        zero_slots = base.experts // (base.slots[0] + 1)  # one slot per plane
        fixed = base.backbone + base.kv_cache + base.scratch + zero_slots
    finally:
        ckpt.close()
    # What loading adds besides the plan's parts (measured at load, in a
    # child): with a roomy budget, so the budget does not depend on it.
    roomy = fixed + level8 // 4 + (256 << 20)
    runtime = run(args, {"budget": roomy}, probe=True)["runtime"]
    rows = []
    for frac in (float(f) for f in args.budgets.split(",")):
        budget = int(fixed + runtime + frac * level8)
        for name in args.configs.split(","):
            opts = dict(CONFIGS[name], budget=budget)
            res = run(args, opts)
            limit = 1.0 / max(
                res["touched_per_token"] / bw["memory_bytes_s"],
                res["read_per_token"] / bw["disk_bytes_s"],
                1e-9,
            )
            res.update(
                config=name,
                budget_fraction=frac,
                budget_mib=budget / 2**20,
                limit_tps=limit,
                of_limit=res["decode_tps"] / limit,
            )
            rows.append(res)
            print(
                f"{frac:.0%} {name}: {res['decode_tps']:.2f} t/s, stall "
                f"{res['stall_fraction']:.0%}, {res['read_per_token'] / 2**20:.1f} "
                f"MiB/token, {res['of_limit']:.0%} of limit",
                file=sys.stderr,
            )
    report = {
        "model": str(args.model),
        "bandwidth": bw,
        "level8_expert_bytes": level8,
        "prompt": args.prompt,
        "gen": args.gen,
        "tokens": f"text {Path(args.text).name}" if args.text else "random ids",
        "threads": args.threads,
        "rows": rows,
    }
    (OUT / args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    bw = report["bandwidth"]
    ppl = any(r.get("perplexity") for r in report["rows"])
    lines = [
        f"memory {bw['memory_bytes_s'] / 1e9:.1f} GB/s, cold disk "
        f"{bw['disk_bytes_s'] / 1e9:.2f} GB/s (measured); tg{report['gen']} "
        f"(one token at a time, {report['tokens']}), {report['threads']} threads",
        "",
        "| budget | config | decode t/s | x lru-8 | stall | MiB read/token | hits "
        "| peak RSS MiB | of limit |" + (" perplexity |" if ppl else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if ppl else ""),
    ]
    for frac in sorted({r["budget_fraction"] for r in report["rows"]}, reverse=True):
        group = [r for r in report["rows"] if r["budget_fraction"] == frac]
        ref = next((r["decode_tps"] for r in group if r["config"] == "lru-8"), None)
        for r in group:
            speedup = f"{r['decode_tps'] / ref:.2f}x" if ref else "-"
            lines.append(
                f"| {frac:.0%} ({r['budget_mib']:,.0f} MiB) | {r['config']} | "
                f"{r['decode_tps']:.2f} | {speedup} | {r['stall_fraction']:.0%} | "
                f"{r['read_per_token'] / 2**20:.1f} | {r['hit_rate']:.0%} | "
                f"{r['peak_rss_mib']:,.0f} | {r['of_limit']:.0%} |"
                + (f" {r['perplexity']:.3f} |" if ppl else "")
            )
    return "\n".join(lines)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
