"""Nothing a user had is lost or overwritten by a failed or concurrent run: one
writer per output (``edgemoe.format.lock``), no leftovers from a SIGKILLed
one, and a chat that ends on a fatal error exits 1."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgemoe.cli import main

CALIB = ("--calib-tokens", "512")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A small random HF model (2 layers of the demo shape): converts in ~1 s."""
    from edgemoe.converters import synth

    return synth.write_hf(
        synth.preset_config("demo", layers=2), tmp_path_factory.mktemp("src") / "hf"
    )


def convert_cmd(src: Path, out: Path, *args) -> list[str]:
    return [sys.executable, "-m", "edgemoe", "convert", str(src), "-o", str(out)] + [
        *CALIB,
        *args,
    ]


def run_main(capsys, *argv, stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        rc = main([str(a) for a in argv])
    finally:
        if stdin is not None:
            sys.stdin = old
    out, err = capsys.readouterr()
    return rc, out, err


def hold_lock(out: Path) -> int:
    """Hold ``out``'s writer lock as another process would (an flock on a
    second open file description conflicts even within this process)."""
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def leftovers(folder: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# -- concurrent writers ----------------------------------------------------------------
def test_two_concurrent_converts_one_wins(src, tmp_path):
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            convert_cmd(src, out),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    # Either "is being written" (they overlapped) or "already exists" (the
    # loser got the lock after the winner was done): never a silent replace.
    assert err.count("\n") == 1 and err.startswith(f"error: {out}: "), err
    assert "Traceback" not in err
    verify = subprocess.run(
        [sys.executable, "-m", "edgemoe", "inspect", str(out), "--verify"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert verify.returncode == 0, verify.stderr
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("force", [False, True])
def test_held_lock_refuses_convert(src, tmp_path, capsys, force):
    out = tmp_path / "out"
    if force:  # a model the user has: --force must not touch it either
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    fd = hold_lock(out)
    try:
        args = ["convert", src, "-o", out, *CALIB] + (["--force"] if force else [])
        rc, _, err = run_main(capsys, *args)
    finally:
        os.close(fd)
    assert rc == 1
    assert err == (
        f"error: {out}: another process (pid {os.getpid()}) is writing it; "
        "wait for it to finish\n"
    )
    assert leftovers(tmp_path, ".out.lock") == (["out"] if force else [])
    if force:
        assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("command", ["export-gguf", "synth", "synth-gguf"])
def test_held_lock_refuses_other_writers(src, tmp_path, capsys, command):
    out = tmp_path / ("model.gguf" if command != "synth" else "hf")
    argv = {
        "export-gguf": ["export-gguf", src, "-o", out, "--force"],
        "synth": ["synth", "--layers", 1, "-o", out, "--force"],
        "synth-gguf": ["synth", "--layers", 1, "--gguf", "Q8_0", "-o", out],
    }[command]
    fd = hold_lock(out)
    try:
        rc, _, err = run_main(capsys, *argv)
    finally:
        os.close(fd)
    assert rc == 1 and "is writing it" in err and str(out) in err, err
    assert leftovers(tmp_path) == [f".{out.name}.lock"]
    # Once the lock is free (here: the holder exited), the same command works
    # and takes its lock file with it.
    rc, _, err = run_main(capsys, *argv)
    assert rc == 0, err
    assert leftovers(tmp_path, f".{out.name}.lock") == [out.name]


# -- what a killed writer leaves -------------------------------------------------------
def test_sigkilled_convert_leaves_nothing_in_the_way(src, tmp_path, capsys):
    out = tmp_path / "out"
    p = subprocess.Popen(
        convert_cmd(src, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    partial = tmp_path / f".out.partial-{p.pid}"
    deadline = time.monotonic() + 60
    while not partial.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert partial.is_dir() and not out.exists()
    # A leftover of another dead writer, and things that only look like one.
    (tmp_path / ".out.partial-999999999").mkdir()
    (tmp_path / ".out.partial-999999999" / "f").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    (tmp_path / ".out.partial-123").symlink_to(elsewhere)
    (tmp_path / ".out.partial-12x").mkdir()
    (tmp_path / ".other.partial-1").mkdir()

    rc, _, err = run_main(capsys, "convert", src, "-o", out, *CALIB)
    assert rc == 0, err
    assert main(["inspect", str(out), "--verify"]) == 0
    # The stale partials are gone; a symlink went without being followed.
    assert (elsewhere / "precious").read_text() == "x"
    assert leftovers(tmp_path) == [
        ".other.partial-1",
        ".out.partial-12x",
        "elsewhere",
        "out",
    ]


def test_killed_while_replacing_gets_the_old_model_back(src, tmp_path, capsys):
    """Killed between moving the old model aside and the new one in: the next
    run puts the old model back and, without --force, leaves it alone."""
    out = tmp_path / "out"
    old = tmp_path / ".out.old-999999999"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"mine": True}))
    rc, _, err = run_main(capsys, "convert", src, "-o", out, *CALIB)
    assert rc == 1 and "already exists" in err
    assert json.loads((out / "manifest.json").read_text()) == {"mine": True}
    assert leftovers(tmp_path) == ["out"]


def test_onnx_is_written_inside_the_commit(src, tmp_path, capsys):
    """``--format onnx`` writes model.onnx in the partial directory, under the
    lock: the model and its export arrive together."""
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, "convert", src, "-o", out, "--format", "onnx", *CALIB)
    assert rc == 0, err
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    assert leftovers(tmp_path) == ["out"]


def test_a_failed_onnx_export_commits_nothing(src, tmp_path, capsys, monkeypatch):
    """An export that fails leaves the previous model as it was (with --force)
    and no partial directory or lock behind."""
    from edgemoe.converters import onnx_export

    out = tmp_path / "out"
    assert run_main(capsys, "convert", src, "-o", out, *CALIB)[0] == 0
    before = (out / "manifest.json").read_bytes()

    def fail(model_dir, level, out=None):
        assert Path(model_dir).name.startswith(".out.partial-")  # not yet in place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export, "export_onnx", fail)
    rc, _, err = run_main(
        capsys, "convert", src, "-o", out, "--format", "onnx", "--force", *CALIB
    )
    assert rc == 1 and "no space left" in err, err
    assert (out / "manifest.json").read_bytes() == before
    assert not (out / "model.onnx").exists()
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--format", "onnx", "--onnx-level", "3"), "level"),
        (("--onnx-level", "4"), "--onnx-level needs --format onnx"),
    ],
)
def test_onnx_options_fail_before_any_work(src, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, "convert", src, "-o", out, *args, *CALIB)
    assert rc == 1 and needle in err, err
    assert leftovers(tmp_path) == []


# -- the chat's exit status ------------------------------------------------------------
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}"
    "{% endif %}"
    "{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CHAT = ("-n", 4, "--temp", 0, "-t", 1)
STATS = "[ Prompt: "


@pytest.fixture(scope="module")
def picky(src, tmp_path_factory) -> Path:
    """``src`` with a chat template that refuses system messages and 'boom'."""
    import shutil

    model = tmp_path_factory.mktemp("picky") / "hf"
    shutil.copytree(src, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "chat_template": TEMPLATE})
    )
    return model


def test_chat_exits_1_after_a_template_error(picky, capsys):
    # A turn the template refuses ends the chat: later lines are not run.
    rc, out, err = run_main(capsys, "chat", picky, *CHAT, stdin="hi\nboom\nafter\n")
    assert rc == 1
    assert (
        err.splitlines()[-1] == "error: chat template refused the conversation: no boom"
    )
    assert out.count(STATS) == 1 and "Traceback" not in err
    # Refused at the start (here, for --system), it ends before the first turn.
    rc, out, err = run_main(capsys, "chat", picky, "--system", "x", *CHAT, stdin="hi\n")
    assert rc == 1 and out == ""
    assert err == "error: chat template refused the conversation: no system messages\n"
    # /set system that the template refuses is refused, and the chat goes on;
    # a normal quit is still 0.
    rc, out, err = run_main(
        capsys, "chat", picky, *CHAT, stdin="/set system be brief\nhi\n/bye\nboom\n"
    )
    assert rc == 0, err
    assert "no system messages; kept the previous system message" in err
    assert out.count(STATS) == 1


def test_chat_with_a_broken_template_exits_1(picky, tmp_path, capsys):
    import shutil

    model = tmp_path / "broken"
    shutil.copytree(picky, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}"  # no endfor
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    rc, out, err = run_main(capsys, "chat", model, *CHAT, stdin="hi\n")
    assert rc == 1 and out == ""
    assert err.startswith(f"error: chat template of {model} failed: ")
    assert err.count("\n") == 1


def test_app_ends_with_status_1_after_a_template_error(picky):
    from functools import partial

    import edgemoe
    from edgemoe.sampling_params import SamplingParams
    from edgemoe.ui.app import ChatApp
    from edgemoe.ui.session import ChatSession
    from edgemoe.ui.widgets import PromptInput

    session = ChatSession(
        partial(edgemoe.load, picky, n_threads=1),
        SamplingParams(max_tokens=4, temperature=0.0, seed=0),
    )
    app = ChatApp(session)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one(PromptInput).load_text("boom")
            await pilot.press("enter")
            deadline = time.monotonic() + 30
            while app.is_running and time.monotonic() < deadline:
                await pilot.pause(0.02)

    try:
        asyncio.run(run())
    finally:
        session.close()
    assert app.return_value == 1
    assert app.fatal == "chat template refused the conversation: no boom"
