"""``edgemoe chat``: the Textual app on a terminal, the line REPL otherwise."""

from __future__ import annotations

import argparse
import sys

from edgemoe.commands.options import (
    add_load_args,
    add_sampling_args,
    load_model,
    sampling_params,
)


def add_parser(sub) -> None:
    ch = sub.add_parser("chat", help="interactive chat with live memory/latency panels")
    add_load_args(ch)
    ch.add_argument("--system", help="system message")
    ch.add_argument(
        "--plain",
        action="store_true",
        help="line REPL instead of the full-screen app (default without a terminal)",
    )
    add_sampling_args(ch)
    ch.set_defaults(func=cmd_chat, n_predict=512)


def cmd_chat(args: argparse.Namespace) -> int:
    from edgemoe.ui.session import ChatSession

    params = sampling_params(args)  # bad values fail before loading
    session = ChatSession(lambda **o: load_model(args, **o), params, args.system)
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
