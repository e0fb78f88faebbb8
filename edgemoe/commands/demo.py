"""``edgemoe demo``: synthesise a small random MoE, convert it, run each level."""

from __future__ import annotations

import argparse
import sys

from edgemoe import __version__
from edgemoe.commands.options import add_sampling_args, sampling_params
from edgemoe.units import mib as _mib
from edgemoe.units import mib_up


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="synthesise a small random MoE and run it")
    d.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="compute threads (default: tuned)",
    )
    add_sampling_args(d)
    d.set_defaults(func=cmd_demo, n_predict=24, seed=0)


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile
    import time
    from pathlib import Path

    from edgemoe.commands.run import stream_completion
    from edgemoe.converters import synth
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.runtime.model import load

    params = sampling_params(args)
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
                stream_completion(model, prompt, params, echo=prompt)
    return 0
