"""Head-to-head under a device-sized memory limit: EdgeMoE against llama.cpp,
each in a fresh process inside one memory cgroup that counts page cache.

    python benchmarks/bench_pressure.py                  # the routed benchmark model
    python benchmarks/bench_pressure.py --model fixture  # the trained fixture
    python benchmarks/bench_pressure.py --limits 0.5 --runs 1 \
        --engines edgemoe,llama-mmap:q4km

A device's memory holds a process's own pages and the file pages it maps or
reads; so does a cgroup's limit (benchmarks/cgroup.py). The limit of a row is
a fraction of the llama.cpp Q4_K_M GGUF's size plus the baseline (the peak of
a process that imports both engines and loads nothing). Before every run the
model files are dropped from the page cache. Engines:

- ``llama-default`` / ``llama-mmap``: llama.cpp (llama-cpp-python) with its
  defaults (extra buffer types on: weights repacked into anonymous memory)
  and with them off (``use_extra_bufts=False``: weights stay file-backed in
  its mmap), on llama.cpp's own Q4_K_M of the same source (``q4km``) and on
  ``edgemoe export-gguf --level 4 --type Q4_K`` of the converted model
  (``l4``): the same weights EdgeMoE's level 4 runs;
- ``edgemoe`` (its defaults: dual routing, prefetch), ``edgemoe-l4``,
  ``edgemoe-l8`` (forced levels), ``edgemoe-lru8`` (level 8, LRU eviction,
  no prefetch: the on-demand baseline), with ``--budget`` = the limit minus what
  the cgroup charges the process just before loading (not its RSS, which
  also counts shared libraries' pages charged elsewhere: about 20 MiB
  more).

Each run: load, a ``--prompt`` token prefill (TTFT), then ``--gen`` tokens one
at a time, teacher-forced from the token stream, so both engines see the same
routing (``bigmoe:q4km``, the expert streamer BigMoeOnEdge, is fed the same
ids through a file: benchmarks/bigmoe.py). Per run: decode t/s, TTFT, peak
cgroup memory, major faults, bytes read from storage, OOM kills. Rows give
the median over ``--runs`` with the range; ratios are EdgeMoE's median over
llama.cpp's best configuration's median, over llama.cpp's defaults on
Q4_K_M, and over the streamer's. Writes
benchmarks/out/pressure.json (``--out``, rewritten after every run) and
prints markdown (benchmarks/pressure_report.py, which also merges files),
with the routing statistics of the token stream (edgemoe/locality.py).

The routed benchmark model is the OLMoE-1B-7B shape with 8 layers and
random weights whose routing is designed (converters/synth_routing.py);
its stream is that design's topic runs. The fixture's stream is its
held-out text.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

import bigmoe  # noqa: E402
import pressure_report  # noqa: E402
from pressure_models import drop_cache, prepare, token_stream  # noqa: E402

LIMITS = "1.5,0.75,0.5,0.3,0.2"
ENGINES = {
    "llama-default:q4km": ("llama", "q4km", {"extra_bufts": True}),
    "llama-mmap:q4km": ("llama", "q4km", {"extra_bufts": False}),
    "llama-default:l4": ("llama", "l4", {"extra_bufts": True}),
    "llama-mmap:l4": ("llama", "l4", {"extra_bufts": False}),
    "edgemoe": ("edgemoe", "edge", {}),
    "edgemoe-l4": ("edgemoe", "edge", {"force_level": 4}),
    "edgemoe-l8": ("edgemoe", "edge", {"force_level": 8}),
    # Fixed thread counts, against the default's tuning (runtime/threads.py).
    "edgemoe-t1": ("edgemoe", "edge", {"n_threads": 1}),
    "edgemoe-t2": ("edgemoe", "edge", {"n_threads": 2}),
    # Reads: buffered or O_DIRECT, on 2, 4 or 8 I/O threads.
    "edgemoe-pread": ("edgemoe", "edge", {"io": "pread", "io_threads": 2}),
    "edgemoe-io4": ("edgemoe", "edge", {"io": "pread", "io_threads": 4}),
    "edgemoe-direct": ("edgemoe", "edge", {"io": "direct", "io_threads": 2}),
    "edgemoe-direct4": ("edgemoe", "edge", {"io": "direct", "io_threads": 4}),
    "edgemoe-direct8": ("edgemoe", "edge", {"io": "direct", "io_threads": 8}),
    # Weights as read: plain kernels, slots filled in place (no repack).
    "edgemoe-plain": ("edgemoe", "edge", {"repack": False}),
    # Without the next layer's guessed experts read ahead.
    "edgemoe-noprefetch": ("edgemoe", "edge", {"prefetch": False}),
    # What CRC-checking every plane read costs (verify=False: none).
    "edgemoe-noverify": ("edgemoe", "edge", {"verify": False}),
    # The on-demand baseline: level 8, LRU eviction, no prefetch.
    "edgemoe-lru8": (
        "edgemoe",
        "edge",
        {"force_level": 8, "eviction": "lru", "prefetch": False},
    ),
    # A llama.cpp-based expert streamer (benchmarks/bigmoe.py): --bigmoe BINARY.
    "bigmoe:q4km": ("bigmoe", "q4km", {}),
}
VARIANTS = {
    "edgemoe-t1",
    "edgemoe-t2",
    "edgemoe-pread",
    "edgemoe-io4",
    "edgemoe-direct",
    "edgemoe-direct4",
    "edgemoe-direct8",
    "edgemoe-noverify",
    "edgemoe-plain",
    "edgemoe-noprefetch",
    "edgemoe-lru8",
    "bigmoe:q4km",
}
"""Engines run only when named (``--engines``)."""
DEFAULT_ENGINES = [n for n in ENGINES if n not in VARIANTS]


# -- the worker (runs inside the cgroup) -----------------------------------------
def worker(args) -> dict:
    from edgemoe.env import prepare_environment

    prepare_environment()
    import llama_cpp  # noqa: F401  (both engines' libraries, as in the baseline)

    import edgemoe
    from edgemoe.runtime.metrics import peak_rss_bytes, rss_bytes

    if args.engine == "baseline":
        return {"peak_rss": peak_rss_bytes()}
    tokens = json.loads(Path(args.tokens).read_text())
    prompt, gen = tokens[: args.prompt], tokens[args.prompt : args.prompt + args.gen]
    n_ctx = args.prompt + args.gen + 8
    opts = json.loads(args.options)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    if args.engine == "edgemoe":
        from cgroup import Cgroup, find_parent

        # What the limit counts is this group's charge, not the RSS (shared
        # libraries' pages are charged where they were first read).
        charge0 = Cgroup(*find_parent()).usage()
        budget = args.limit - charge0
        m = edgemoe.load(args.path, n_ctx=n_ctx, budget=budget, **opts)
    else:
        from edgemoe.runtime.llamacpp import LlamaCpp

        m = LlamaCpp(args.path, n_ctx=n_ctx, n_threads=_threads(), **opts)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    m.eval(prompt)
    ttft = time.perf_counter() - t1
    # Stall during decode alone: the prefill's waits are part of its TTFT.
    stall0 = m.counters()["stall_s"] if args.engine == "edgemoe" else 0.0
    step = []
    for tok in gen:
        t = time.perf_counter()
        m.eval([tok])
        step.append(time.perf_counter() - t)
    out = {
        "rss_before_load": rss0,
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_tps": len(gen) / sum(step),
        "median_token_ms": statistics.median(step) * 1e3,
        "peak_rss": peak_rss_bytes(),
        "io_read_bytes": _proc_io("read_bytes"),
    }
    if args.engine == "edgemoe":
        c = m.counters()
        out.update(
            budget=budget,
            charge_before_load=charge0,
            thread_use=m.device.tuner.summary(),
            expert_bytes_read=c["bytes_read"],
            stall_s=c["stall_s"],
            decode_stall_s=c["stall_s"] - stall0,
            decode_s=sum(step),
            io=m.routed.cache.io.kind,
            io_copied_bytes=getattr(m.routed.cache.io, "copied_bytes", 0),
        )
    else:
        out["threads"] = _threads()
    return out


def _threads() -> int:
    """llama.cpp's own default (llama-cli, llama-server): the physical cores."""
    from edgemoe.runtime.device import default_threads

    return default_threads()


def _proc_io(key: str) -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k == key:
                return int(v)
    return 0


# -- the parent -------------------------------------------------------------------
def settle(busy: bool, wait: float = 30.0) -> None:
    """Wait until the last run's exit and write-back are over: no runnable
    task other than this one (and the spinner with ``--busy``), two seconds
    in a row, or ``wait`` seconds."""
    quiet, end = 0, time.monotonic() + wait
    while quiet < 4 and time.monotonic() < end:
        with open("/proc/loadavg") as fh:
            running = int(fh.read().split()[3].split("/")[0])
        quiet = quiet + 1 if running <= 1 + busy else 0
        time.sleep(0.5)


def run_one(args, group_name: str, limit: int, engine: str, path: Path, options):
    from cgroup import Cgroup

    env = None
    if engine == "bigmoe":
        cmd, env = bigmoe.command(
            Path(args.bigmoe), path, limit, args.tokens_file, args.prompt,
            args.gen, threads=_threads(),
        )  # fmt: skip
    else:
        cmd = [
            sys.executable, __file__, "--worker", engine, "--path", str(path),
            "--limit", str(limit), "--options", json.dumps(options),
            "--tokens", str(args.tokens_file), "--prompt", str(args.prompt),
            "--gen", str(args.gen),
        ]  # fmt: skip
    group = Cgroup.create(group_name, limit)
    try:
        res = group.run(cmd, timeout=args.timeout, cwd=OUT, env=env)
    finally:
        group.remove()
    row = {
        "returncode": res.returncode,
        "seconds": res.seconds,
        "peak_cgroup": res.peak_bytes,
        "oom_kills": res.oom_kills,
        "major_faults": res.major_faults,
        "read_bytes": res.read_bytes,
        "timed_out": res.timed_out,
    }
    if res.returncode == 0 and engine == "bigmoe":
        row.update(bigmoe.parse(res.stdout), cmd=cmd[1:], status="ok")
    elif res.returncode == 0:
        row.update(json.loads(res.stdout.strip().splitlines()[-1]))
        row["status"] = "ok"
    else:
        tail = res.stderr.strip().splitlines()[-1:] or [""]
        if "is below the minimum" in tail[0]:  # EdgeMoE's own refusal
            need = tail[0].split("the minimum ")[1].split(" (")[0]
            tail = [f"refused: the minimum budget is {need}"]
        row["status"] = pressure_report.failure(
            res.returncode, res.oom_kills, res.timed_out, tail[0]
        )
    return row


def routing_trace(path: Path, tokens: list[int]) -> tuple[list, int]:
    """Each MoE layer's expert ids [T, K] over ``tokens``, from EdgeMoE's own
    router (in memory at level 8), and their locality summary."""
    import numpy as np

    import edgemoe
    from edgemoe.locality import layer_locality

    with edgemoe.load(path, force_level=8) as m:
        m.route_log = []
        # Windows of the model's context (n_ctx=0: min(training, 4096)).
        for i in range(0, len(tokens), m.n_ctx):
            m.reset()
            m.eval(tokens[i : i + m.n_ctx], all_logits=True)  # every layer routes
        n_expert = m.spec.n_expert
        steps = m.route_log
    per_layer = [np.concatenate([s[il] for s in steps]) for il in steps[0]]
    fracs = (0.25, 0.4, 0.5, 0.75)  # 40%: the published reference point
    return [layer_locality(ids, n_expert, fracs) for ids in per_layer], n_expert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="routed", choices=["routed", "fixture"])
    ap.add_argument("--limits", default=LIMITS)
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    ap.add_argument(
        "--busy",
        action="store_true",
        help="run a CPU-bound process on the side for the whole benchmark",
    )
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--bigmoe", help="BigMoeOnEdge's bmoe-cli (benchmarks/bigmoe.py)")
    ap.add_argument("--trace-tokens", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default="pressure.json")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.engine = args.worker
        print(json.dumps(worker(args)))
        return 0
    if args.runs < 1 or args.gen < 64 or args.prompt < 1:
        ap.error("--runs >= 1, --gen >= 64 and --prompt >= 1")
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    if "bigmoe:q4km" in engines and not args.bigmoe:
        ap.error("bigmoe:q4km needs --bigmoe BINARY (benchmarks/bigmoe.py builds it)")
    try:
        limits = [float(x) for x in args.limits.split(",")]
    except ValueError:
        ap.error(f"--limits must be fractions like 0.5,0.3; got {args.limits!r}")

    from cgroup import Cgroup, CgroupError

    # A kill runs the cleanup too: no cgroup or spinner is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    OUT.mkdir(parents=True, exist_ok=True)
    try:  # before hours of preparation: can we limit memory at all?
        Cgroup.create(f"edgemoe-bench-{os.getpid()}", 1 << 30).remove()
    except CgroupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    paths = prepare(args.model)
    if args.prepare_only:
        return 0
    need = args.prompt + args.gen
    stream = token_stream(args.model, paths, max(need, args.trace_tokens))
    args.tokens_file = OUT / "pressure" / args.model / "tokens.json"
    args.tokens_file.write_text(json.dumps(stream[:need]))
    gguf = paths["q4km"].stat().st_size
    print("measuring the baseline ...", file=sys.stderr)
    base = run_one(args, f"edgemoe-base-{os.getpid()}", 8 << 30, "baseline",
                   paths["edge"], {})  # fmt: skip
    if base["status"] != "ok":
        print(f"error: baseline run failed: {base['status']}", file=sys.stderr)
        return 1
    baseline = base["peak_cgroup"]
    spinner = None
    if args.busy:  # outside the cgroup: another program on the device
        spin = "import time\nend = time.time() + 86400\nwhile time.time() < end: pass"
        spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        return _run_all(args, engines, limits, paths, stream, baseline, gguf)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def _run_all(args, engines, limits, paths, stream, baseline, gguf) -> int:
    report = {
        "model": args.model,
        "busy": args.busy,
        "gguf_bytes": gguf,
        "baseline_bytes": baseline,
        "prompt": args.prompt,
        "gen": args.gen,
        "runs": args.runs,
        "files": {k: str(v) for k, v in paths.items()},
        "rows": [],
    }
    for frac in limits:
        limit = int(frac * gguf + baseline)
        for rep in range(args.runs):
            # A new order each time: no engine always runs first, or always
            # after the same engine (whose reads or exit may still be settling).
            order = list(engines)
            random.Random(f"{frac}/{rep}").shuffle(order)
            for name in order:
                kind, key, opts = ENGINES[name]
                drop_cache([paths["edge"], paths["l4"], paths["q4km"]])
                settle(busy=args.busy)
                row = run_one(args, f"edgemoe-bench-{os.getpid()}", limit, kind,
                              paths[key], opts)  # fmt: skip
                row.update(engine=name, fraction=frac, limit=limit, rep=rep)
                report["rows"].append(row)
                print(pressure_report.progress(row), file=sys.stderr)
                (OUT / args.out).write_text(json.dumps(report, indent=1))
    print("routing statistics ...", file=sys.stderr)
    layers, n_expert = routing_trace(paths["edge"], stream[: args.trace_tokens])
    report["n_expert"] = n_expert
    report["routing"] = [
        vars(x) | {"lru_hits": {str(k): v for k, v in x.lru_hits.items()}}
        for x in layers
    ]
    (OUT / args.out).write_text(json.dumps(report, indent=1))
    from edgemoe.locality import markdown as routing_md

    print(pressure_report.markdown(report))
    print()
    print(routing_md(layers, n_expert))
    return 0


if __name__ == "__main__":
    sys.exit(main())
