"""``edgemoe chat --plain``: a line REPL for ssh sessions and pipes. Each line is
a user turn or a slash command; replies and ``[ Prompt | Generation ]`` lines
go to stdout, errors to stderr. A ``FatalChatError`` ends the REPL: ``main``
prints it and exits 1. Never imports Textual."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TextIO

from edgemoe.errors import EdgeMoEError
from edgemoe.ui.session import ChatSession, FatalChatError, help_lines

KEYS = (
    ("Ctrl+C", "stop the reply (twice: quit)"),
    ("Ctrl+D", "quit"),
)


def run_repl(
    session: ChatSession,
    interactive: bool,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Read turns until EOF or ``/bye``; 0. ``interactive`` shows a ``>>>``
    prompt with line editing. Raises ``FatalChatError``."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("edgemoe chat: /help lists commands, /bye or Ctrl+D quits", file=err)
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                print(file=err)
                break
        else:
            line = stdin.readline()
            if not line:
                break
        text = line.strip()
        if not text:
            continue
        if text == "?":
            print("\n".join(help_lines(KEYS)), file=out, flush=True)
        elif text.startswith("/"):
            try:
                result = session.execute(text)
            except FatalChatError:
                raise
            except EdgeMoEError as e:
                print(f"error: {e}", file=err, flush=True)
                continue
            if result.lines:
                print("\n".join(result.lines), file=out, flush=True)
            if result.quit:
                break
        else:
            _reply(session, text, out, err)
    return 0


def _reply(session: ChatSession, text: str, out: TextIO, err: TextIO) -> None:
    from edgemoe.report import stats_line

    turn = session.turn(text)
    restore = _stop_on_sigint(session.stop)
    try:
        for r in turn:
            out.write(r.text)
            out.flush()
    except FatalChatError:
        raise
    except EdgeMoEError as e:
        print(f"error: {e}", file=err, flush=True)
        return
    finally:
        restore()
    out.write("\n")
    result = turn.result()
    if result.finish_reason == "stopped":
        out.write("[ stopped ]\n")
    out.write(stats_line(result.timings) + "\n")
    out.flush()


def _stop_on_sigint(stop: threading.Event):
    """While a reply streams, Ctrl+C ends it at the next token; a second one
    interrupts as usual. Returns the function that restores the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    old = signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, old)
