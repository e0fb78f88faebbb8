"""``edgemoe convert``, ``export-gguf`` and ``synth``: the commands that write
models. Each writes under a lock and commits atomically (format/lock.py)."""

from __future__ import annotations

import argparse
import sys

from edgemoe.progress import Progress
from edgemoe.units import mib as _mib


def add_parser(sub) -> None:
    from edgemoe.converters.synth_presets import PRESETS

    c = sub.add_parser("convert", help="convert a checkpoint into nested expert planes")
    c.add_argument("source", metavar="SRC", help="HF checkpoint directory or GGUF")
    c.add_argument("-o", "--output", required=True, help="model directory to write")
    c.add_argument(
        "--levels",
        default="2,4,8",
        help="nested bit widths, increasing by 2/4/6/8 (default 2,4,8)",
    )
    c.add_argument(
        "--backbone-type",
        default="Q4_K_M",
        help="backbone weights: Q4_K_M (default: Q4_K, the head and attn_v "
        "Q6_K, as llama.cpp's mix), Q8_0, Q6_K, Q4_K, Q4_0, F16, F32",
    )
    c.add_argument("--calib", help="calibration text file (default: built-in)")
    c.add_argument(
        "--calib-tokens",
        type=int,
        default=4096,
        help="calibration tokens (default 4096; fewer converts faster)",
    )
    c.add_argument(
        "--format",
        default="gguf",
        choices=("gguf", "onnx"),
        help="gguf (default), or onnx: also write model.onnx",
    )
    c.add_argument("--onnx-level", type=int, help="expert level in the ONNX export")
    c.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    c.set_defaults(func=cmd_convert)

    x = sub.add_parser("export-gguf", help="write a llama.cpp-loadable GGUF")
    x.add_argument("model", metavar="MODEL")
    x.add_argument("-o", "--output", required=True, help="GGUF file to write")
    x.add_argument(
        "--type",
        default="Q8_0",
        help="F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q4_K, Q6_K "
        "(converted models: the experts' type; the backbone keeps its own)",
    )
    x.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    x.add_argument(
        "--level",
        type=int,
        default=None,
        help="converted models: the expert level to export (default: top)",
    )
    x.set_defaults(func=cmd_export_gguf)

    y = sub.add_parser("synth", help="write a RANDOM-weight model of a real shape")
    y.add_argument(
        "--preset",
        default="demo",
        help=", ".join(PRESETS) + " (default: demo)",
    )
    y.add_argument("--layers", type=int, default=None, help="override the layer count")
    y.add_argument("-o", "--output", required=True, help="directory (HF) or .gguf file")
    y.add_argument("--gguf", metavar="TYPE", help="write a GGUF of this type instead")
    y.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    y.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    y.set_defaults(func=cmd_synth)


def tensor_progress(label: str, stream=None, tty: bool | None = None) -> Progress:
    """Progress of a writer that reports ``(tensor name, i, n)``."""
    return Progress(
        label,
        lambda name, i, n: (i + 1) / max(n, 1),
        lambda name, i, n: f"tensor {i + 1}/{n} {name}",
        stream,
        tty=tty,
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.quant.types import NestedQuant
    from edgemoe.report import print_convert_summary

    if args.onnx_level is not None and args.format != "onnx":
        from edgemoe.errors import ConfigError

        raise ConfigError("--onnx-level needs --format onnx")
    levels = NestedQuant.parse(args.levels)
    opts = ConvertOptions(
        levels=levels,
        backbone_type=args.backbone_type,
        calib=args.calib,
        calib_tokens=args.calib_tokens,
        force=args.force,
        # Written inside the model's atomic commit, under its lock.
        onnx_level=(args.onnx_level or levels.levels[-1])
        if args.format == "onnx"
        else None,
    )
    progress = convert_progress()
    try:
        report = convert(args.source, args.output, opts, progress)
    except KeyboardInterrupt:
        progress.close()
        print(
            f"interrupted; nothing written ({args.output} is as it was)",
            file=sys.stderr,
        )
        return 130
    finally:
        progress.close()
    print_convert_summary(report)
    return 0


BACKBONE_SHARE = 0.1
"""About the share of a conversion the backbone takes (bench_convert's
OLMoE shape); the layers share the rest, each in proportion to its experts."""


def convert_progress(
    stream=None, tty: bool | None = None, every: float = 5.0
) -> Progress:
    """Progress of ``convert``'s stages as one fraction: the backbone's
    tensors, then each layer's experts."""
    at = {"layer": 0, "layers": 1}

    def fraction(stage: str, i: int, n: int) -> float | None:
        if stage == "backbone":
            return BACKBONE_SHARE * i / max(n, 1)
        if stage == "layer":
            at["layer"], at["layers"] = i, max(n, 1)
            return BACKBONE_SHARE + (1 - BACKBONE_SHARE) * i / at["layers"]
        if stage == "experts":
            layers = at["layer"] + i / max(n, 1)
            return BACKBONE_SHARE + (1 - BACKBONE_SHARE) * layers / at["layers"]
        return None

    def describe(stage: str, i: int, n: int) -> str:
        if stage == "backbone":
            return f"backbone tensor {min(i + 1, n)}/{n}"
        if stage == "layer":
            return f"layer {min(i + 1, n)}/{n}"
        return f"layer {at['layer'] + 1}/{at['layers']}, experts {i}/{n}"

    return Progress("converting", fraction, describe, stream, every, tty)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.converters.llama_gguf import write_gguf

    ckpt = open_checkpoint(args.model)
    if getattr(ckpt, "manifest", None) is not None:
        from edgemoe.converters.level_view import LevelCheckpoint

        ckpt = LevelCheckpoint(ckpt, args.level, args.type)
    elif args.level is not None:
        ckpt.close()
        from edgemoe.errors import ConfigError

        raise ConfigError("--level applies to converted EdgeMoE models")
    progress = tensor_progress("writing")
    try:
        out = write_gguf(
            ckpt, args.output, args.type, force=args.force, progress=progress
        )
    finally:
        progress.close()
        ckpt.close()
    print(f"wrote {out} ({_mib(out.stat().st_size)})")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from edgemoe.converters import synth

    cfg = synth.preset_config(args.preset, layers=args.layers)
    progress = tensor_progress("synthesising")
    try:
        if args.gguf:
            out = synth.write_gguf(
                cfg, args.output, args.gguf, seed=args.seed, force=args.force,
                progress=progress,
            )  # fmt: skip
        else:
            out = synth.write_hf(
                cfg, args.output, seed=args.seed, force=args.force, progress=progress
            )
    finally:
        progress.close()
    print(f"wrote {out}: {synth.LABEL}")
    return 0
