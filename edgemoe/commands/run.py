"""``edgemoe run``: one completion, streamed to stdout, stats on stderr."""

from __future__ import annotations

import argparse
import sys

from edgemoe.commands.options import (
    add_load_args,
    add_sampling_args,
    load_model,
    sampling_params,
)
from edgemoe.report import completion_lines


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="generate a completion for a prompt")
    add_load_args(r)
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
    add_sampling_args(r)
    r.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad values fail before loading
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
    with load_model(args) as model:
        echo = ""
        if args.chat:
            messages = []
            if args.system:
                messages.append({"role": "system", "content": args.system})
            messages.append({"role": "user", "content": prompt})
            prompt = messages
        elif not args.no_echo:
            echo = prompt
        stream_completion(model, prompt, params, echo=echo)
    return 0


def stream_completion(model, prompt, params, out=None, err=None, echo: str = ""):
    """Print a completion as it is generated, then the stats; the last response.
    ``echo`` is printed once the prompt is accepted, so a prompt refused (too long
    for the context) is not dumped to stdout before the error."""
    from edgemoe.runtime.metrics import StepTotals

    # Looked up per call, not bound at import: callers (and tests) swap sys.stdout.
    out = out or sys.stdout
    err = err or sys.stderr
    last = None
    totals = StepTotals()
    for r in model.generate(prompt, params):
        if last is None:
            out.write(echo)
        out.write(r.text)
        out.flush()
        last = r
        if r.metrics is not None:
            totals.add(r.metrics)
    out.write("\n")
    out.flush()
    if last is not None:
        plan = getattr(model, "memory", None)
        budget = plan.budget if plan is not None and model.options.budget else None
        for line in completion_lines(last, totals, budget):
            print(line, file=err)
    return last
