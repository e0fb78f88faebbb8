"""The ``edgemoe`` command. Subcommands import what they need when they run.

Errors EdgeMoE raises on purpose print as one ``error: ...`` line on stderr and
exit 1; usage errors exit 2 (argparse); Ctrl+C exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgemoe import __version__
from edgemoe.report import offload_line, stats_line
from edgemoe.units import mib as _mib
from edgemoe.units import mib_up


class Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a misspelt option or command, and the
    usage of the command it belongs to (Python 3.14's ``suggest_on_error``,
    for every version we support)."""

    def error(self, message: str):
        import difflib

        wrong = None
        if message.startswith("unrecognized arguments: "):
            wrong = message.split(": ", 1)[1].split()[0].split("=")[0]
            known = [o for a in self._actions for o in a.option_strings]
        elif message.startswith("argument COMMAND: invalid choice: "):
            wrong = message.split("'")[1]
            known = [c for a in self._actions if a.dest == "command" for c in a.choices]
        if wrong:
            near = difflib.get_close_matches(wrong, known, n=1, cutoff=0.6)
            if near:
                message += f" (did you mean {near[0]}?)"
        super().error(message)


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="HF checkpoint directory, GGUF file or converted EdgeMoE model",
    )
    p.add_argument(
        "-c",
        "--ctx",
        type=int,
        default=0,
        help="context length (default: min(model's, 4096))",
    )
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="compute threads (default: tuned while running, physical cores to 1)",
    )
    p.add_argument(
        "-b",
        "--batch",
        type=int,
        default=256,
        help="prompt tokens per prefill step (default: 256)",
    )
    p.add_argument(
        "--cache-type",
        default="f32",
        choices=("f32", "f16"),
        help="KV cache precision (default: f32; f16 halves its memory)",
    )
    p.add_argument(
        "--no-repack",
        action="store_true",
        help="keep weights in their file layout (faster MoE prefill, slower "
        "decode for Q4_0/Q4_K on CPUs with interleaved kernels)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "gpu", "auto"),
        help="ggml device (gpu is untested)",
    )
    p.add_argument(
        "--level",
        type=int,
        default=None,
        help="converted models: run every expert at this level (bits)",
    )
    p.add_argument(
        "--budget",
        default=None,
        help="converted models: memory budget (e.g. 3GiB); experts stream from disk",
    )
    p.add_argument(
        "--quality",
        default="balanced",
        help="dual routing: max, high, balanced (default), fast, min, or T1,T2",
    )
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not load the next layer's predicted experts ahead",
    )
    from edgemoe.runtime.options import IO_KINDS

    p.add_argument(
        "--io",
        default="auto",
        choices=IO_KINDS,
        help="expert reads: O_DIRECT where the model's file system takes it, "
        "else buffered pread (auto, the default), or either one",
    )
    from edgemoe.profile_cli import add_load_args

    add_load_args(p)


def _load(args: argparse.Namespace, **overrides: Any):
    """Load ``args.model`` with the command line's options; ``overrides`` (any
    ``edgemoe.load`` option) win, e.g. chat's ``/set budget``."""
    from edgemoe.runtime.model import load

    options = dict(
        n_ctx=args.ctx,
        n_threads=args.threads,
        n_batch=args.batch,
        kv_type=args.cache_type,
        repack=not args.no_repack,
        device=args.device,
        force_level=args.level,
        budget=args.budget,
        quality=args.quality,
        prefetch=not args.no_prefetch,
        io=args.io,
    )
    from edgemoe.profile_cli import load_overrides

    options.update(load_overrides(args))
    options.update(overrides)
    return load(args.model, **options)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n", "--n-predict", type=int, default=128, help="tokens to generate"
    )
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy")
    p.add_argument(
        "--top-k", type=int, default=40, help="sample among the k likeliest (40)"
    )
    p.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus probability mass (0.95)"
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=0.05,
        help="drop tokens under this share of the likeliest (0.05)",
    )
    p.add_argument(
        "--repeat-penalty",
        type=float,
        default=1.0,
        help="divide repeated tokens' logits by this (1.0: off)",
    )
    p.add_argument(
        "--repeat-last-n",
        type=int,
        default=64,
        help="tokens the repeat penalty looks back over (64)",
    )
    p.add_argument(
        "-s", "--seed", type=int, default=None, help="sampling seed (default: random)"
    )
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable)"
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-text"
    )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=args.n_predict,
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _stream(model, prompt, args, out=None, err=None, echo: str = ""):
    """Print a completion as it is generated, then the stats; the last response.
    ``echo`` is printed once the prompt is accepted, so a prompt refused (too long
    for the context) is not dumped to stdout before the error."""
    # Looked up per call, not bound at import: callers (and tests) swap sys.stdout.
    out = out or sys.stdout
    err = err or sys.stderr
    last = None
    steps = []
    for r in model.generate(prompt, **_sampling(args)):
        if last is None:
            out.write(echo)
        out.write(r.text)
        out.flush()
        last = r
        if r.metrics is not None:
            steps.append(r.metrics)
    out.write("\n")
    out.flush()
    if last is not None:
        t = last.timings
        print(stats_line(t), file=err)
        print(
            f"prompt {t.prompt_tokens} tokens in {t.prompt_s * 1e3:.0f} ms"
            + (f" ({t.cached_tokens} cached)" if t.cached_tokens else "")
            + " · "
            f"generated {t.generation_tokens} in {t.generation_s * 1e3:.0f} ms · "
            f"TTFT {t.ttft_s * 1e3:.0f} ms · finish: {last.finish_reason}",
            file=err,
        )
        peak = max(last.memory.peak_rss_bytes, last.memory.rss_bytes)
        print(f"peak memory: {_mib(peak)} RSS", file=err)
        if getattr(model, "memory", None) is not None and model.options.budget:
            print(offload_line(steps, model.memory.budget, t), file=err)
    return last


# -- run ---------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if args.file is not None:
        from pathlib import Path

        from edgemoe.errors import ModelFileError

        try:
            prompt = Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            raise ModelFileError(
                args.file, f"cannot read prompt file: {e.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ModelFileError(args.file, "prompt file is not UTF-8 text") from None
    with _load(args) as model:
        echo = ""
        if args.chat:
            messages = []
            if args.system:
                messages.append({"role": "system", "content": args.system})
            messages.append({"role": "user", "content": prompt})
            prompt = messages
        elif not args.no_echo:
            echo = prompt
        _stream(model, prompt, args, echo=echo)
    return 0


# -- chat --------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    from edgemoe.ui.session import ChatSession, Sampling

    sampling = Sampling(**_sampling(args))  # bad values fail before loading
    session = ChatSession(lambda **o: _load(args, **o), sampling, args.system)
    try:
        # Pipes and ssh without a terminal get the line REPL (no Textual import).
        if args.plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
            from edgemoe.ui.repl import run_repl

            return run_repl(session, interactive=sys.stdin.isatty())
        from edgemoe.ui.app import run_app

        return run_app(session)
    finally:
        summary = session.summary()
        session.close()
        print(summary, file=sys.stderr)


# -- bench -------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from edgemoe.runtime.bench import bench

    text = _read_text(args.text) if args.text else None  # fail before loading
    with _load(args) as model:
        tokens = model.tokenize(text, add_special=False) if text else None
        from edgemoe.progress import Progress

        # Plain lines between repetitions even on a terminal: a live bar's
        # refresh thread would take CPU from the runs it times.
        progress = Progress(
            "benchmarking",
            lambda test, i, n: i / max(n, 1),
            lambda test, i, n: f"{test}, {i}/{n} tokens",
            tty=False,
        )
        results = [
            r.summary()
            for r in bench(
                model, args.n_prompt, args.n_gen, args.reps, tokens=tokens,
                progress=progress,
            )
        ]  # fmt: skip
        size = (
            sum(f.stat().st_size for f in Path(args.model).glob("*"))
            if Path(args.model).is_dir()
            else Path(args.model).stat().st_size
        )
        budget = model.memory.budget if model.memory else None
        plan = dataclasses.asdict(model.memory) if model.memory else None
        thread_use = model.device.tuner.summary()
    # Tuned per graph: say which counts ran how much of the time.
    threads = args.threads or "auto: " + ", ".join(
        f"{n} ({share:.0%})"
        for n, share in sorted(thread_use.items(), reverse=True)
        if share >= 0.005
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "bytes": size,
                    "budget": budget,
                    "memory": plan,
                    "threads": args.threads,
                    "thread_use": thread_use,
                    "results": results,
                },
                indent=1,
            )
        )
        return 0
    budget_col = _mib(budget) if budget else "all"
    print(
        "| model | size | budget | threads | test | t/s | stall | MiB read/token "
        "| hits |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {Path(args.model).name} | {_mib(size)} | {budget_col} | "
            f"{threads} | {r['test']} | {r['tps']:.2f} ± "
            f"{r['tps_sd']:.2f} | {r['stall_fraction']:.0%} | "
            f"{r['read_per_token'] / 2**20:.1f} | {r['hit_rate']:.0%} |"
        )
    return 0


# -- eval --------------------------------------------------------------------------
def _read_text(path: str) -> str:
    from pathlib import Path

    from edgemoe.errors import ModelFileError

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ModelFileError(path, "not UTF-8 text") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from edgemoe.runtime.perplexity import perplexity

    text = _read_text(args.text)
    with _load(args) as model:
        tokens = model.tokenize(text, add_special=False)
        if args.ctx and args.window > args.ctx:
            args.window = args.ctx

        from edgemoe.progress import Progress

        progress = Progress(
            "evaluating",
            lambda stage, i, n: i / max(n, 1),
            lambda stage, i, n: f"window {i}/{n}",
        )
        try:
            res = perplexity(
                model, tokens, args.window, lambda i, n: progress("", i, n)
            )
        finally:
            progress.close()
    if args.json:
        print(
            json.dumps(
                {
                    "perplexity": res.perplexity,
                    "tokens": res.tokens,
                    "nll": res.nll,
                    "windows": res.windows,
                    "window": args.window,
                    "seconds": res.seconds,
                }
            )
        )
    else:
        print(
            f"perplexity: {res.perplexity:.4f} over {res.tokens} tokens "
            f"({res.windows} windows of {args.window}, {res.seconds:.1f} s)"
        )
    return 0


# -- inspect -----------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from edgemoe.report import inspect_report, print_inspect

    rep = inspect_report(args.model, verify=args.verify)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_inspect(rep, tensors=args.tensors)
    return 0


# -- demo ----------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile
    import time
    from pathlib import Path

    from edgemoe.converters import synth
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.runtime.model import load

    print(f"EdgeMoE {__version__} demo: {synth.LABEL}.", file=sys.stderr)
    print(
        "The text below is noise; it shows the pipeline and its speed.\n",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="edgemoe-demo-") as tmp:
        t0 = time.perf_counter()
        src, dst = Path(tmp) / "hf", Path(tmp) / "edgemoe"
        synth.write_hf(synth.preset_config("demo"), src)
        t1 = time.perf_counter()
        report = convert(src, dst, ConvertOptions(calib_tokens=1024))
        s = report.manifest.spec
        print(
            f"synthesised a {s.family} MoE ({s.n_layer} layers, {s.n_expert} "
            f"experts, {s.n_expert_used} active) in {t1 - t0:.1f} s and converted "
            f"it to nested levels {list(report.manifest.levels)} in "
            f"{report.seconds:.1f} s",
            file=sys.stderr,
        )
        from edgemoe.format.reader import EdgeCheckpoint
        from edgemoe.runtime.offload import budgets

        ckpt = EdgeCheckpoint(dst)
        try:
            need = budgets(ckpt).resident  # what convert and inspect print
        finally:
            ckpt.close()
        prompt = "def main():"
        for level in reversed(report.manifest.levels):
            print(
                f"\n--- level {level}: experts {_mib(report.level_bytes[level])}, "
                f"all resident from {mib_up(need[level])} (--budget)",
                file=sys.stderr,
            )
            with load(dst, n_threads=args.threads, force_level=level) as model:
                _stream(model, prompt, args, echo=prompt)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="edgemoe",
        description="Run Mixture-of-Experts language models on small devices.",
    )
    p.add_argument("--version", action="version", version=f"edgemoe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="generate a completion for a prompt")
    _add_load_args(r)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--file", help="read the prompt from a file")
    r.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the chat template",
    )
    r.add_argument("--system", help="system message (with --chat)")
    r.add_argument("--no-echo", action="store_true", help="do not print the prompt")
    _add_sampling_args(r)
    r.set_defaults(func=cmd_run)

    ch = sub.add_parser("chat", help="interactive chat with live memory/latency panels")
    _add_load_args(ch)
    ch.add_argument("--system", help="system message")
    ch.add_argument(
        "--plain",
        action="store_true",
        help="line REPL instead of the full-screen app (default without a terminal)",
    )
    _add_sampling_args(ch)
    ch.set_defaults(func=cmd_chat, n_predict=512)

    bn = sub.add_parser("bench", help="prompt and generation speed (llama-bench style)")
    _add_load_args(bn)
    bn.add_argument(
        "-p",
        "--n-prompt",
        type=int,
        default=128,
        help="prompt tokens per prefill test (default: 128)",
    )
    bn.add_argument(
        "-n",
        "--n-gen",
        type=int,
        default=64,
        help="tokens generated per decode test (default: 64)",
    )
    bn.add_argument(
        "-r",
        "--reps",
        type=int,
        default=2,
        help="repetitions of each test; the table shows mean ± sd (default: 2)",
    )
    bn.add_argument(
        "--text", help="UTF-8 file: evaluate its tokens instead of random ids"
    )
    bn.add_argument("--json", action="store_true", help="print one JSON object")
    bn.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="perplexity over a text file")
    _add_load_args(e)
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--window", type=int, default=256, help="tokens per window (256)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    from edgemoe.convert_cli import add_parsers as add_convert

    add_convert(sub)

    i = sub.add_parser("inspect", help="architecture, sizes and tensors of a model")
    i.add_argument("model", metavar="MODEL")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.add_argument(
        "--verify",
        action="store_true",
        help="re-hash an EdgeMoE model's files against its manifest",
    )
    i.set_defaults(func=cmd_inspect)

    from edgemoe.profile_cli import add_parser as add_profile

    add_profile(sub)

    d = sub.add_parser("demo", help="synthesise a small random MoE and run it")
    d.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="compute threads (default: tuned)",
    )
    _add_sampling_args(d)
    d.set_defaults(func=cmd_demo, n_predict=24, seed=0)
    p.commands = sub.choices
    return p


def main(argv: list[str] | None = None) -> int:
    from edgemoe.errors import EdgeMoEError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, with its usage
        parser.commands[args.command].error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    try:
        return args.func(args)
    except EdgeMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
