"""``edgemoe inspect``: a model's architecture, sizes, budgets and tensors."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgemoe.report import inspect_report, print_inspect

    rep = inspect_report(args.model, verify=args.verify)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_inspect(rep, tensors=args.tensors)
    return 0
