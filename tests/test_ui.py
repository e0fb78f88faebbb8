"""``edgemoe chat``: the Textual app driven by its pilot on the trained fixture
(plain and converted under a budget), the line REPL over pipes, and the real
app in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from functools import partial
from pathlib import Path

import pytest

import edgemoe
from edgemoe.errors import ConfigError, ContextOverflowError
from edgemoe.sampling_params import SamplingParams
from edgemoe.ui.session import ChatSession

STATS = re.compile(r"\[ Prompt: \d+\.\d t/s \| Generation: \d+\.\d t/s \]")
ANSI = re.compile(
    r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[P_^].*?\x1b\\|.)"
)
GREEDY = dict(temperature=0.0, seed=0)


def plain_session(path, **sampling) -> ChatSession:
    return ChatSession(
        partial(edgemoe.load, path, n_threads=1),
        SamplingParams(**{"max_tokens": 8, **GREEDY, **sampling}),
    )


@pytest.fixture(scope="module")
def budgeted(converted_fixture):
    """The converted fixture's loader under a budget that holds about a quarter
    of the experts, so the residency map has holes and experts stream."""
    small = dict(n_ctx=256, n_batch=32, n_threads=1)
    with edgemoe.load(converted_fixture, **small) as m:
        plan = m.memory
    per_expert = plan.experts // (plan.slots[0] + 1)
    budget = plan.backbone + plan.kv_cache + plan.scratch + per_expert * 9
    return partial(edgemoe.load, converted_fixture, **small), budget


# -- messages and the session (no Textual app) -----------------------------------------
def test_metrics_messages_coalesce():
    from edgemoe.ui.messages import MetricsUpdate, PromptSubmitted, WorkFailed
    from edgemoe.ui.stats import LiveStats

    a, b = MetricsUpdate(1, "x", LiveStats()), MetricsUpdate(1, "xy", LiveStats())
    assert a.can_replace(b) and b.can_replace(a)
    # Never across replies, and never other messages (text and errors matter).
    assert not a.can_replace(MetricsUpdate(2, "", LiveStats()))
    assert not a.can_replace(PromptSubmitted("hi"))
    assert not WorkFailed("e").can_replace(WorkFailed("e"))


def test_session_history_and_commands(fixture_dir):
    s = plain_session(fixture_dir)
    assert s.execute("/set system be brief").lines == ("system message set",)
    first = s.turn("def main():")
    replies = [r.text for r in first]
    assert first.result().finish_reason == "length" and "".join(replies)
    n1 = s.last.prompt_tokens
    second = s.turn("again")
    list(second)
    # Multi-turn: the chat template renders system, both turns and the reply.
    assert [m["role"] for m in s.messages()] == ["system", *["user", "assistant"] * 2]
    assert s.messages()[2]["content"] == first.text
    # The second turn resends the conversation; the first turn's prompt is
    # still in the KV cache and is not evaluated again.
    assert s.last.cached_tokens >= n1
    assert (
        s.last.prompt_tokens + s.last.cached_tokens > n1 + first.final.generation_tokens
    )
    assert s.execute("/set temp 0.5").lines == ("temp = 0.5",)
    assert s.sampling.temperature == 0.5
    s.execute("/set n-predict 3")
    s.execute("/set seed random")
    s.execute("/set top_k 7")
    assert (s.sampling.max_tokens, s.sampling.seed, s.sampling.top_k) == (3, None, 7)
    assert "top-k 7" in s.execute("/set").lines[0]
    bad = {
        "/set temp x": "temp must be a number",
        "/set temp -1": "temperature must be finite and >= 0",
        "/set top-p 2": "top_p must be in (0, 1]",
        "/set n-predict 0": "n-predict must be >= 1",
        "/set ignore-eos maybe": "ignore-eos takes on or off",
        "/set colour red": "cannot /set 'colour'",
        "/set temp": "/set temp needs a value",
        "/set budget 2GiB": "budget applies to converted models",
        "/quality fast": "quality applies to converted models",
        "/frobnicate": "unknown command /frobnicate",
    }
    for line, error in bad.items():
        with pytest.raises(ConfigError, match=re.escape(error)):
            s.execute(line)
    assert s.sampling.temperature == 0.5  # nothing changed by the failures
    assert any(x.startswith("/set KEY VALUE") for x in s.execute("/help").lines)
    stats = s.execute("/stats").lines
    assert "2 turn(s)" in stats[0] and "finish: length" in stats[1]
    assert "n/a (all experts resident)" in stats[2] and "peak RSS" in stats[-1]
    assert s.execute("/reset").reset and s.messages()[1:] == []
    assert s.messages() == [{"role": "system", "content": "be brief"}]
    s.execute("/set system")
    assert s.messages() == [] and "system none" in s.execute("/set").lines
    # A prompt longer than the context fails at the first step, as one line,
    # and leaves no half turn in the history.
    with pytest.raises(ContextOverflowError, match="longer than the context"):
        list(s.turn("x " * 1500))
    assert s.messages() == [] and s.turns == 0
    assert s.execute("/bye").quit
    assert "weights" in s.summary() and "peak RSS" in s.summary()
    s.close()
    assert s.model is None


def test_chat_command_line_defaults():
    from edgemoe.cli import build_parser
    from edgemoe.commands.options import sampling_params

    args = build_parser().parse_args(["chat", "m", "--system", "hi", "--plain"])
    assert (args.n_predict, args.system, args.plain) == (512, "hi", True)
    assert sampling_params(args).max_tokens == 512


def test_repl_ctrl_c_handler():
    """The REPL's SIGINT handler: the first Ctrl+C asks the reply to stop, a
    second one interrupts; the old handler comes back afterwards."""
    import threading

    from edgemoe.ui.repl import _stop_on_sigint

    before = signal.getsignal(signal.SIGINT)
    stop = threading.Event()
    restore = _stop_on_sigint(stop)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before


# -- the Textual app -------------------------------------------------------------------
async def wait_for(pilot, cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def submit(pilot, app, text: str, typed: bool = False) -> None:
    """Put ``text`` in the prompt (``typed``: key by key), press Enter, and
    wait for the reply or command to end."""
    from edgemoe.ui.widgets import PromptInput

    if typed:
        await pilot.press(*text)
    else:
        app.query_one(PromptInput).load_text(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: not app.busy, f"{text!r} to finish")


def panels(app) -> tuple[str, str]:
    from edgemoe.ui.widgets import LatencyPanel, MemoryPanel

    return str(app.query_one(MemoryPanel).content), app.query_one(LatencyPanel).text


def test_app_streams_stops_and_takes_commands(fixture_dir):
    from edgemoe.ui.app import ChatApp
    from edgemoe.ui.widgets import ChatPane, HelpScreen, PromptInput

    app = ChatApp(plain_session(fixture_dir))

    async def main():
        async with app.run_test(size=(130, 40)) as pilot:
            chat = app.query_one(ChatPane)
            memory, _ = panels(app)
            assert "experts: all resident" in memory and "RSS" in memory
            await submit(pilot, app, "def main():", typed=True)
            reply = app.session.history[-1]["content"]
            assert reply and reply in chat.transcript()
            assert "def main():" in chat.transcript()
            assert len(STATS.findall(chat.transcript())) == 1
            _, latency = panels(app)
            assert re.search(r"generation  \d+\.\d t/s \(8 tokens\)", latency)
            assert re.search(r"TTFT        \d+ ms", latency)
            assert "n/a (all experts resident)" in latency
            spark = app.query_one("#latency-spark").data
            assert len(spark) == 7 and all(ms > 0 for ms in spark)

            # Ctrl+J inserts a newline; the message goes out whole on Enter.
            prompt = app.query_one(PromptInput)
            await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
            assert prompt.text == "a\nb\nc"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.busy, "the two-line turn")
            assert app.session.history[-2]["content"] == "a\nb\nc"

            await submit(pilot, app, "/set temp 0.5")
            assert app.session.sampling.temperature == 0.5
            assert "temp = 0.5" in chat.transcript()
            await submit(pilot, app, "/set temp hot")
            assert "error: temp must be a number, got 'hot'" in chat.transcript()

            # Ctrl+C stops a long reply after its first tokens; the app stays.
            await submit(pilot, app, "/set n-predict 1000")
            await submit(pilot, app, "/set ignore-eos on")
            app.query_one(PromptInput).load_text("hello")
            # Not pilot.press: it then waits for an idle CPU, i.e. for much of
            # the reply; the app gets Enter the same way either way.
            app.simulate_key("enter")
            await wait_for(
                pilot,
                lambda: app.reply is not None and len(str(app.reply.content)) > 4,
                "the first tokens",
            )
            assert app.busy  # tokens are in the pane while generation runs
            await pilot.press("ctrl+c")
            await wait_for(pilot, lambda: not app.busy, "the stopped reply")
            assert app.last_finish == "stopped" and app.is_running
            assert app.session.last.generation_tokens < 1000
            assert "[ stopped ]" in chat.transcript()
            assert len(STATS.findall(chat.transcript())) == 3

            await submit(pilot, app, "/reset")
            assert app.session.history == []
            assert "def main():" not in chat.transcript()
            assert "conversation cleared" in chat.transcript()

            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            assert "Ctrl+C" in str(app.screen.query_one("#help").content)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("?", "enter")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")

            # A prompt over the context is a one-line error; the app goes on.
            await submit(pilot, app, "x " * 1500)
            assert re.search(
                r"error: prompt of \d+ tokens is longer than the context",
                chat.transcript(),
            )
            await pilot.press("ctrl+c")  # idle: nothing to stop, and no quitting
            assert app.is_running and not app.busy

            # Ctrl+Q in the middle of a long reply quits; the reply ends with it.
            app.query_one(PromptInput).load_text("hello")
            app.simulate_key("enter")
            await wait_for(
                pilot,
                lambda: app.reply is not None and str(app.reply.content),
                "tokens",
            )
            await pilot.press("ctrl+q")
            await pilot.pause()
        assert app.return_value == 0

    asyncio.run(main())
    assert not app.is_running
    t = time.monotonic()
    app.session.close()
    assert app.session.model is None and time.monotonic() - t < 10


def test_app_context_full(fixture_dir):
    from edgemoe.ui.app import ChatApp
    from edgemoe.ui.widgets import ChatPane

    session = ChatSession(
        partial(edgemoe.load, fixture_dir, n_ctx=48, n_threads=1),
        SamplingParams(max_tokens=100, ignore_eos=True, **GREEDY),
    )
    app = ChatApp(session)

    async def main():
        async with app.run_test(size=(130, 40)) as pilot:
            await submit(pilot, app, "x[0] = [/b]")  # shown as typed, not markup
            assert app.last_finish == "context"
            transcript = app.query_one(ChatPane).transcript()
            assert "x[0] = [/b]" in transcript
            assert "[ context full: /reset starts over ]" in transcript
            assert STATS.search(transcript)
            await pilot.press("ctrl+q")

    asyncio.run(main())
    session.close()


def test_app_memory_map_budget_and_quality(budgeted):
    from edgemoe.ui.app import ChatApp
    from edgemoe.ui.widgets import ChatPane

    loader, budget = budgeted
    session = ChatSession(
        partial(loader, budget=budget), SamplingParams(max_tokens=8, **GREEDY)
    )
    app = ChatApp(session)

    def residency_rows(memory: str) -> list[str]:
        return re.findall(r"^ +\d+ ([·▁-█]+)$", memory, re.M)

    async def main():
        async with app.run_test(size=(130, 40)) as pilot:
            chat = app.query_one(ChatPane)
            memory, _ = panels(app)
            assert f"budget {budget / 2**20:,.1f} MiB · quality balanced" in memory
            assert "backbone" in memory and "free" in memory
            await submit(pilot, app, "def main():")
            memory, latency = panels(app)
            rows = residency_rows(memory)
            assert len(rows) == 4 and all(len(r) == 8 for r in rows)
            assert "·" in "".join(rows)  # a quarter fits: some experts are out
            assert re.search(r"[▃▆█]", "".join(rows))  # ... and some are in
            assert re.search(r"hits        L2 \d+%", latency)
            read = float(re.search(r"read        ([\d.]+) MiB/token", latency)[1])
            assert read > 0

            await submit(pilot, app, "/set budget 1MiB")
            assert re.search(
                r"error: budget 1\.0 MiB .* below the minimum", chat.transcript()
            )
            assert "kept the previous budget" in chat.transcript()
            assert app.session.model.memory.budget == budget
            await submit(pilot, app, "def f():")  # still works
            assert len(STATS.findall(chat.transcript())) == 2

            await submit(pilot, app, f"/set budget {budget * 2}")
            assert (
                f"reloaded with budget {budget * 2 / 2**20:,.1f} MiB"
                in chat.transcript()
            )
            assert f"budget {budget * 2 / 2**20:,.1f} MiB" in panels(app)[0]
            await submit(pilot, app, "/quality fast")
            assert "quality fast" in panels(app)[0]
            assert app.session.model.options.quality == "fast"
            await submit(pilot, app, "/stats")
            assert "quality fast" in chat.transcript()
            await submit(pilot, app, "/bye")
            await pilot.pause()
        assert app.return_value == 0

    asyncio.run(main())
    session.close()


# -- the line REPL over pipes ----------------------------------------------------------
def chat(fixture_dir, cwd: Path, *args, stdin: str = "", timeout: int = 120):
    """``python -m edgemoe chat`` with ``stdin`` piped (the cli fixture cannot
    feed stdin); cwd off the repo root like the cli fixture."""
    return subprocess.run(
        [sys.executable, "-m", "edgemoe", "chat", str(fixture_dir), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_repl_over_pipes(fixture_dir, tmp_path):
    proc = chat(
        fixture_dir, tmp_path, "--temp", 0, "-n", 8, "--system", "be brief",
        stdin="def main():\n/set temp nope\n\nclass A:\n/stats\n/set\n?\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(STATS.findall(proc.stdout)) == 2
    assert "2 turn(s)" in proc.stdout and "finish: length" in proc.stdout
    assert "error: temp must be a number, got 'nope'" in proc.stderr
    assert "system 'be brief'" in proc.stdout  # --system, shown by /set
    assert "Ctrl+D          quit" in proc.stdout  # ? lists commands and keys
    assert ">>>" not in proc.stdout  # no prompt on a pipe
    assert re.search(r"^memory: weights .* peak RSS [\d.,]+ MiB$", proc.stderr, re.M)
    # /bye ends the session (what follows is not run), and the line REPL
    # never imports Textual: it must start over ssh without a terminal.
    script = (
        "import io, sys; from edgemoe.cli import main; "
        "sys.stdin = io.StringIO('/bye\\nhello\\n'); "
        f"rc = main(['chat', {str(fixture_dir)!r}]); "
        "assert 'textual' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    # Bad options fail before the session starts, as one line.
    proc = chat(fixture_dir, tmp_path, "--temp", -1, stdin="")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: temperature must be finite")


def test_repl_ctrl_c_stops_the_reply(fixture_dir, tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-m", "edgemoe", "chat", str(fixture_dir), "--temp", "0",
         "-n", "1000", "--ignore-eos", "-c", "1024"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=tmp_path,
    )  # fmt: skip
    try:
        p.stdin.write(b"def main():\n")
        p.stdin.flush()
        out = read_until(p.stdout.fileno(), lambda b: len(b.strip()) > 8, 60)
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(b"/stats\n/bye\n", timeout=60)
    finally:
        p.kill()
    text = (out + rest).decode()
    assert p.returncode == 0, err.decode()
    assert "[ stopped ]" in text and len(STATS.findall(text)) == 1
    assert "finish: stopped" in text
    generated = int(re.search(r"generated (\d+) at", text)[1])
    assert 0 < generated < 900


# -- the real app in a pseudo-terminal -------------------------------------------------
def read_until(fd: int, done, timeout: float, buf: bytes = b"") -> bytes:
    """Read ``fd`` until ``done(buf)``, or with ``done`` None until EOF (a pty
    reads EIO once the child and every copy of its side are gone)."""
    deadline = time.monotonic() + timeout
    while done is None or not done(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; last output: {buf[-2000:]!r}")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def screen(buf: bytes) -> str:
    return ANSI.sub("", buf.decode("utf-8", errors="replace"))


def spawn_in_pty(cwd: Path, *args) -> tuple[subprocess.Popen, int]:
    """``python -m edgemoe ARGS`` on a 130x40 pseudo-terminal; (process, master)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 130, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="130", LINES="40")
    env.pop("NO_COLOR", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "edgemoe", *map(str, args)],
        stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    return p, master


def test_app_in_a_pseudo_terminal(fixture_dir, tmp_path):
    p, master = spawn_in_pty(tmp_path, "chat", fixture_dir, "--temp", 0, "-n", 8)
    try:
        buf = read_until(master, lambda b: "/help lists commands" in screen(b), 60)
        os.write(master, b"def main():\r")
        buf = read_until(master, lambda b: "Generation:" in screen(b), 60, buf)
        assert STATS.search(screen(buf))
        os.write(master, b"\x11")  # Ctrl+Q
        buf = read_until(master, None, 60, buf)
        assert p.wait(timeout=30) == 0, screen(buf)[-2000:]
    finally:
        p.kill()
        os.close(master)
    assert "Traceback" not in screen(buf)
    assert "peak RSS" in screen(buf)  # the exit summary, after the app is gone


def test_plain_repl_in_a_pseudo_terminal(fixture_dir, tmp_path):
    """--plain on a terminal: the line REPL with its >>> prompt; Ctrl+D quits."""
    p, master = spawn_in_pty(
        tmp_path, "chat", fixture_dir, "--plain", "--temp", 0, "-n", 8
    )
    try:
        buf = read_until(master, lambda b: b">>> " in b, 60)
        assert b"/help lists commands" in buf
        os.write(master, b"def main():\r")
        buf = read_until(master, lambda b: b"Generation:" in b, 60, buf)
        buf = read_until(master, lambda b: b.count(b">>> ") == 2, 60, buf)
        os.write(master, b"\x04")  # Ctrl+D: EOF at the prompt
        buf = read_until(master, None, 60, buf)
        assert p.wait(timeout=30) == 0, buf.decode(errors="replace")
    finally:
        p.kill()
        os.close(master)
    text = screen(buf)
    assert STATS.search(text) and "peak RSS" in text
    assert "Traceback" not in text
