"""Batch runner: executes fuzz cases in-process, one JSON line per case.

Started by ``fuzz/run.py`` as ``python fuzz/worker.py`` (by path, so the repo
root -- where ``edgemoe`` is the bare source folder -- is not on sys.path), it
imports EdgeMoE once and then runs case after case: ~50 ms each instead of
~1 s for a fresh interpreter. Anything that kills the process (a signal from C,
the memory cap) or hangs is seen by the parent, which restarts the worker and
re-runs that case alone with the real CLI to confirm it.

Protocol: a request ``{"dir", "argv"}`` (CLI case: ``edgemoe.cli.main(argv)``
with ``dir`` as the working directory) or ``{"dir", "call": "template"}``
(``render_chat`` on ``dir/template.json``); the reply is ``{"rc", "stderr"}``
where ``stderr`` holds Python's traceback when one escaped. Self-contained on
purpose: no imports from the fuzz package.

``python fuzz/worker.py --one DIR`` runs ``DIR/case.json``'s case once and
exits with its status: the reproducer for template cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def _render(case_dir: str) -> int:
    from edgemoe.checkpoint.chat_template import render_chat
    from edgemoe.errors import EdgeMoEError

    with open(os.path.join(case_dir, "template.json"), encoding="utf-8") as fh:
        spec = json.load(fh)
    try:
        render_chat(spec["template"], spec["messages"], **spec.get("vars", {}))
    except EdgeMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_case(req: dict) -> dict:
    """Run one case, capturing Python-level output; a traceback that escapes
    is written into the captured stderr, the way the interpreter would."""
    from edgemoe.cli import main

    os.chdir(req["dir"])
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if req.get("call") == "template":
                rc = _render(req["dir"])
            else:
                rc = main(req["argv"])
    except SystemExit as e:  # argparse's usage errors, or a sys.exit deep inside
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            err.write(f"{e.code}\n")
    except BaseException:  # noqa: BLE001 -- that is the finding
        err.write(traceback.format_exc())
        rc = 1
    # The last 40 lines, each cut to 500 characters (see run.clip).
    text = "\n".join(ln[:500] for ln in err.getvalue().splitlines()[-40:])
    return {"rc": rc if isinstance(rc, int) else 0, "stderr": text}


def serve() -> None:
    # Keep the protocol on private descriptors: EdgeMoE (or C) writing to fd 1
    # or reading fd 0 must not corrupt or consume it.
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    import edgemoe.cli  # noqa: F401 -- pay the imports before the first case
    import edgemoe.runtime.model  # noqa: F401

    proto_out.write('{"ready": true}\n')
    proto_out.flush()
    for line in proto_in:
        req = json.loads(line)
        reply = run_case(req)
        proto_out.write(json.dumps(reply) + "\n")
        proto_out.flush()


def one(case_dir: str) -> int:
    with open(os.path.join(case_dir, "case.json"), encoding="utf-8") as fh:
        case = json.load(fh)
    if case.get("call") == "template":
        return _render(case_dir)
    from edgemoe.cli import main

    os.chdir(case_dir)
    return main(case["argv"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        sys.exit(one(sys.argv[2]))
    serve()
