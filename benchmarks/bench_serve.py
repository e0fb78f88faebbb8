"""``edgemoe serve`` under concurrent streams, against llama-cpp-python's server.

    python benchmarks/bench_serve.py [--models fixture,synthetic]
        [--streams 1,4,8,16] [--gen 64] [--runs 2] [--threads 2]

For each model: a GGUF of its weights (Q8_0, ``edgemoe export-gguf``) served
by ``edgemoe serve`` in memory and by ``python -m llama_cpp.server`` (its
defaults but llama.cpp's extra buffer types, which crash MoE GGUFs on AMX
CPUs; the same threads and context), and the converted model served by
``edgemoe serve`` at a 50% budget (halfway between the smallest budget that
runs it and the one that holds every level-8 expert). Each server runs in its
own process with ``--parallel`` equal to the streams (and a context of
``streams x (prompt + gen)`` tokens); C concurrent streamed completions with
different prompts and ``max_tokens`` ``--gen`` start together. Aggregate
decode t/s is the completion tokens of all streams over the wall time from
the first request to the last token, prefill included; TTFT p50/p95 per
concurrency. "engine only" rows run the same streams through EdgeMoE's
scheduler in the benchmark's own process, without HTTP or a client: what
batching gives before the server, its client and ggml share the cores.
Configurations interleave run by run; tables show the median and range
over runs. Writes benchmarks/out/serve.json.

llama-cpp-python's server needs its extra: ``pip install
'llama-cpp-python[server]'``; without it those rows are skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "code-mixtral"
PROMPTS = [
    "def fib(n):",
    "import os\n",
    "class Stack:",
    "for i in range(10):",
    "# read the file",
    "x = [",
    "while True:",
    "print(",
    "def main():",
    "from typing import",
    "try:",
    "with open(",
    "if __name__",
    "return [",
    "async def fetch(",
    "@dataclass\nclass",
]


LLAMA_SERVER = """
import sys
import llama_cpp.llama_cpp as C
default = C.llama_model_default_params
def no_extra_bufts():  # they crash MoE GGUFs on AMX CPUs (runtime/llamacpp.py)
    p = default()
    p.use_extra_bufts = False
    return p
C.llama_model_default_params = no_extra_bufts
sys.argv[0] = "llama_cpp.server"
from llama_cpp.server.__main__ import main
main()
"""
"""``python -m llama_cpp.server`` with llama.cpp's extra buffer types off."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models(which: list[str]) -> dict[str, tuple[Path, Path]]:
    """name -> (GGUF of its weights, converted model), made once."""
    from edgemoe.converters.convert import ConvertOptions, convert

    out: dict[str, tuple[Path, Path]] = {}
    for name in which:
        if name == "fixture":
            src = FIXTURE
        elif name == "synthetic":  # OLMoE's shape, 2 layers (bench_convert's)
            src = OUT / "convert" / "olmoe-1b-7b-L2-hf"
            if not (src / "config.json").exists():
                from edgemoe.converters import synth

                synth.write_hf(synth.preset_config("olmoe-1b-7b", layers=2), src)
        else:
            raise SystemExit(f"unknown model {name!r} (fixture, synthetic)")
        conv = OUT / "serve" / f"{name}-edge"
        if not (conv / "manifest.json").exists():
            convert(src, conv, ConvertOptions(force=True))
        gguf = OUT / "serve" / f"{name}-q8_0.gguf"
        if not gguf.exists():
            gguf.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edgemoe",
                    "export-gguf",
                    str(src),
                    "-o",
                    str(gguf),
                    "--type",
                    "Q8_0",
                ],
                check=True,
                cwd=OUT,
            )
        out[name] = (gguf, conv)
    return out


def half_budget(conv: Path, n_ctx: int) -> int:
    from edgemoe.format.reader import EdgeCheckpoint
    from edgemoe.runtime.offload import budgets

    ckpt = EdgeCheckpoint(conv)
    try:
        b = budgets(ckpt, n_ctx)
    finally:
        ckpt.close()
    return (b.minimum + b.resident[max(b.resident)]) // 2


def start(kind: str, model: Path, streams: int, n_ctx: int, threads: int, budget):
    port = free_port()
    if kind == "llama.cpp":
        cmd = [
            sys.executable,
            "-c",
            LLAMA_SERVER,
            "--model",
            str(model),
            "--port",
            str(port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "edgemoe",
            "serve",
            str(model),
            "--port",
            str(port),
            "-np",
            str(streams),
            "-c",
            str(n_ctx),
            "-t",
            str(threads),
        ]
        if budget:
            cmd += ["--budget", str(budget)]
    proc = subprocess.Popen(
        cmd, cwd=OUT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    import urllib.request

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2):
                return proc, base
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{kind} server did not start") from None
            time.sleep(0.2)


def eos_ids(gguf: Path) -> list[int]:
    import edgemoe

    with edgemoe.load(gguf, n_ctx=64, n_threads=1) as m:
        return sorted(set(m.tokenizer.eos_ids) | set(m.spec.eos_token_ids))


def one_stream(base: str, prompt: str, gen: int, kind: str, eos=()) -> tuple:
    """(TTFT s, completion tokens, time of the last token) of one stream;
    every stream generates ``gen`` tokens (EOS banned).

    Tokens are the server's count (``usage``, asked for with
    ``stream_options``), else ``gen`` when the stream ended for length: not
    the chunks, since text held back (a character's first bytes, a stop
    string's prefix) joins a later chunk, and random weights make a third
    of their tokens such bytes."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    body = {"prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if kind == "edgemoe":
        body["ignore_eos"] = True
    else:  # llama-cpp-python's server has no ignore_eos
        body["logit_bias"] = {str(t): -100.0 for t in eos}
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Content-Type": "application/json"},
    )
    r = conn.getresponse()
    ttft, chunks, usage, reason, last = None, 0, None, None, t0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        choice = (chunk.get("choices") or [{}])[0]
        reason = choice.get("finish_reason") or reason
        if choice.get("text"):
            chunks += 1
            last = time.perf_counter()
            if ttft is None:
                ttft = last - t0
    conn.close()
    if usage:
        tokens = usage["completion_tokens"]
    else:
        tokens = gen if reason == "length" else chunks
    return ttft or 0.0, tokens, last


def run_streams(base: str, c: int, gen: int, kind: str, eos) -> dict:
    with cf.ThreadPoolExecutor(c) as pool:
        t0 = time.perf_counter()
        got = list(pool.map(lambda p: one_stream(base, p, gen, kind, eos), PROMPTS[:c]))
    return summary(got, t0)


def summary(streams, t0: float) -> dict:
    """Aggregate t/s and TTFT p50/p95 of streams' (TTFT s, tokens, time of
    the last token), started at ``t0``."""
    ttfts = sorted(t for t, _, _ in streams)
    tokens = sum(n for _, n, _ in streams)
    return {
        "tps": tokens / (max(end for _, _, end in streams) - t0),
        "tokens": tokens,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def serve_streams(kind, model, c, n_ctx, budget, args, eos) -> dict:
    """C streams against ``kind``'s server (started here, warmed up, ended)."""
    server = kind.split()[0]
    proc, base = start(server, model, c, n_ctx, args.threads, budget)
    try:
        one_stream(base, "warm up", 4, server, eos)
        return run_streams(base, c, args.gen, server, eos)
    finally:
        proc.terminate()
        proc.wait(30)


def run_engine(gguf: Path, c: int, n_ctx: int, gen: int, threads: int) -> dict:
    """The same C streams through EdgeMoE's scheduler in this process, on
    its main thread as ``edgemoe serve`` runs it, without HTTP or a client:
    what the engine alone does with them (the same keys as run_streams)."""
    import edgemoe
    from edgemoe.runtime.scheduler import Request, Scheduler
    from edgemoe.sampling_params import SamplingParams

    with edgemoe.load(gguf, n_ctx=n_ctx, n_seq_max=c, n_threads=threads) as m:
        sched = Scheduler(m, parallel=c, thread=False)
        greedy = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
        got: dict[int, list] = {}  # request -> [TTFT, tokens, last token's time]
        finished: set[int] = set()

        def submit(i: int, prompt: str, params, of: int) -> None:
            ids = tuple(m.tokenize(prompt, add_special=False))

            def emit(ev) -> None:
                seen = got.setdefault(i, [0.0, 0, 0.0])
                if ev.token is not None:
                    seen[0] = ev.ttft_s or 0.0
                    seen[1] += 1
                    seen[2] = time.perf_counter()
                if ev.finish_reason:
                    finished.add(i)
                    if len(finished) == of:
                        sched.close()  # run() returns

            sched.submit(Request(ids, params, None), emit)

        submit(0, "warm up", SamplingParams(max_tokens=4, temperature=0), 1)
        sched.run()  # warm up, as the servers are
        sched = Scheduler(m, parallel=c, thread=False)
        got.clear()
        finished.clear()
        t0 = time.perf_counter()
        for i, prompt in enumerate(PROMPTS[:c]):
            submit(i, prompt, greedy, c)
        sched.run()
    return summary(list(got.values()), t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fixture,synthetic")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt-room", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="serve.json")
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    try:
        import llama_cpp.server.app  # noqa: F401

        kinds = ["engine only", "edgemoe", "edgemoe 50%", "llama.cpp"]
    except ImportError:
        print("llama_cpp.server missing (pip install 'llama-cpp-python[server]')")
        kinds = ["engine only", "edgemoe", "edgemoe 50%"]
    results: dict = {}
    for name, (gguf, conv) in models(args.models.split(",")).items():
        eos = eos_ids(gguf)
        for run in range(args.runs):
            for c in streams:
                n_ctx = c * (args.prompt_room + args.gen)
                for kind in kinds:
                    budget = half_budget(conv, n_ctx) if kind == "edgemoe 50%" else None
                    if kind == "engine only":
                        r = run_engine(gguf, c, n_ctx, args.gen, args.threads)
                    else:
                        r = serve_streams(kind, conv if budget else gguf, c, n_ctx,
                                          budget, args, eos)  # fmt: skip
                    r["budget"] = budget
                    results.setdefault(name, {}).setdefault(kind, {}).setdefault(
                        str(c), []
                    ).append(r)
                    print(
                        f"run {run + 1} {name} {kind} x{c}: {r['tps']:.1f} t/s, "
                        f"TTFT p50 {r['ttft_p50'] * 1e3:.0f} ms",
                        flush=True,
                    )
    (OUT / args.out).write_text(
        json.dumps(
            {"args": vars(args), "commit": _commit(), "results": results}, indent=1
        )
    )
    print(markdown(results))
    return 0


def _commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    return proc.stdout.strip()


def markdown(results: dict) -> str:
    rows = [
        "| model | server | streams | aggregate t/s [range] | vs 1 stream | "
        "vs llama.cpp | TTFT p50 / p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_kind in results.items():
        for kind, by_c in by_kind.items():
            base = statistics.median(r["tps"] for r in by_c.get("1", [{"tps": 0}]))
            for c, runs in by_c.items():
                tps = [r["tps"] for r in runs]
                med = statistics.median(tps)
                ref = by_kind.get("llama.cpp", {}).get(c)
                vs_ref = (
                    f"{med / statistics.median(r['tps'] for r in ref):.2f}x"
                    if ref and kind != "llama.cpp"
                    else "-"
                )
                p50 = statistics.median(r["ttft_p50"] for r in runs) * 1e3
                p95 = statistics.median(r["ttft_p95"] for r in runs) * 1e3
                rows.append(
                    f"| {name} | {kind} | {c} | {med:.1f} [{min(tps):.1f}-"
                    f"{max(tps):.1f}] | {med / base if base else 0:.2f}x | {vs_ref} | "
                    f"{p50:.0f} / {p95:.0f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
