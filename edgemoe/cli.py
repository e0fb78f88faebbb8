"""The ``edgemoe`` command: a parser over the subcommands in
``edgemoe.commands``, one module each. Building it imports none of the runtime.

Errors EdgeMoE raises on purpose print as one ``error: ...`` line on stderr and
exit 1; usage errors exit 2 (argparse); Ctrl+C exits 130.
"""

from __future__ import annotations

import argparse
import sys

from edgemoe import __version__

COMMANDS = (
    "run", "chat", "serve", "bench", "eval", "convert", "inspect", "profile", "demo"
)  # fmt: skip
"""Modules of ``edgemoe.commands``, in the order ``--help`` lists them
(``convert`` adds ``export-gguf`` and ``synth`` after itself)."""


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


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    p = Parser(
        prog="edgemoe",
        description="Run Mixture-of-Experts language models on small devices.",
    )
    p.add_argument("--version", action="version", version=f"edgemoe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f"edgemoe.commands.{name}").add_parser(sub)
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
