"""The flags several commands share, and what they become: ``edgemoe.load``
options (``load_model``) and one ``SamplingParams`` (``sampling_params``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edgemoe.sampling_params import SamplingParams
from edgemoe.units import mib as _mib


def add_load_args(p: argparse.ArgumentParser) -> None:
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
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--profile",
        metavar="NAME",
        help="converted models: budget from a device profile (see edgemoe profile)",
    )
    g.add_argument(
        "--emulate",
        metavar="NAME",
        help="as --profile, and expert reads throttled to its storage speed",
    )


def load_model(args: argparse.Namespace, **overrides: Any):
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
    options.update(profile_overrides(args))
    options.update(overrides)
    return load(args.model, **options)


def profile_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``edgemoe.load`` options that ``--profile``/``--emulate`` imply; an
    explicit ``--budget`` wins. Prints what it does on stderr."""
    name = getattr(args, "emulate", None) or getattr(args, "profile", None)
    if not name:
        return {}
    prof = resolve_profile(name)
    converted = (Path(args.model) / "manifest.json").is_file()
    out: dict[str, Any] = {}
    if not converted:
        print(
            f"profile {prof.name}: {args.model} is not a converted model; it is held "
            f"in memory whole ({prof.name} has {_mib(prof.memory_usable)} usable)",
            file=sys.stderr,
        )
        return out
    if args.budget is None:
        out["budget"] = prof.memory_usable
        line = f"profile {prof.name}: budget {_mib(prof.memory_usable)}"
    else:
        line = f"profile {prof.name}: budget {args.budget} (--budget)"
    if getattr(args, "emulate", None):
        out["throttle"] = (prof.storage_rand_read * 1e6, prof.storage_latency_ms / 1e3)
        line += (
            f", expert reads throttled to {prof.storage_rand_read:,.0f} MB/s + "
            f"{prof.storage_latency_ms:.2f} ms (compute runs at this machine's speed)"
        )
    print(line, file=sys.stderr)
    return out


def resolve_profile(name: str):
    """A profile by name, path, or "auto" (this machine)."""
    if name == "auto":
        from edgemoe.commands.probe import auto_profile

        return auto_profile()[0]
    from edgemoe.profile import load_profile

    return load_profile(name)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
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


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as one ``SamplingParams``; a bad value is one
    ConfigError before any model loads."""
    return SamplingParams(
        max_tokens=args.n_predict,
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def read_text(path: str) -> str:
    """A UTF-8 text file given on the command line; one typed line if not."""
    from edgemoe.errors import ModelFileError

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ModelFileError(path, "not UTF-8 text") from None
