"""What every bad input must give: one ``error:`` line on stderr, exit 1, no
traceback. Shared by the bad-input, validation, safety and fuzz tests."""

from __future__ import annotations

import subprocess

from edgemoe.cli import main


def error_line(stderr: str) -> str:
    """The one line of an EdgeMoE error on stderr, checked for form."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def assert_cli_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    line = error_line(proc.stderr)
    for n in needles:
        assert n in line, (n, line)
    return line


def assert_main_error(capsys, argv: list, *needles: str) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    line = error_line(err)
    for n in needles:
        assert n in line, (n, line)
    return line
