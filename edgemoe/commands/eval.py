"""``edgemoe eval``: perplexity over a text file, in windows."""

from __future__ import annotations

import argparse
import json

from edgemoe.commands.options import add_load_args, load_model, read_text
from edgemoe.report import perplexity_line


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity over a text file")
    add_load_args(e)
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--window", type=int, default=256, help="tokens per window (256)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from edgemoe.runtime.perplexity import perplexity

    text = read_text(args.text)
    with load_model(args) as model:
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
        print(perplexity_line(res, args.window))
    return 0
