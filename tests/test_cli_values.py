"""Option values a careless user types: each is one typed error line, not a
traceback (a fuzzer found each of these as one)."""

from __future__ import annotations

import pytest

import edgemoe
from edgemoe.errors import ConfigError
from edgemoe.units import parse_size


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--budget", "9" * 400], "memory size must be positive and below 2**60"),
        (["--budget", "1e400"], "cannot read memory size"),
        (["-s", "-1"], "seed must be an integer in 0..2**64-1"),
        (["-s", str(2**64)], "seed must be an integer"),
        (["-p", "hi\udcff"], "not valid UTF-8"),
    ],
)
def test_bad_values_are_one_error_line(converted_fixture, cli, args, needle):
    base = ["run", converted_fixture, "-n", "1"]
    if "-p" not in args:
        base += ["-p", "hi"]
    proc = cli(*base, *args)
    assert proc.returncode == 1, proc.stderr[-1000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-1000:]
    assert needle in lines[0]
    assert len(lines[0]) < 300  # the value is shortened, not echoed whole


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2**70, -1, 0])
def test_parse_size_bounds(value):
    with pytest.raises(ConfigError):
        parse_size(value)


def test_api_refuses_non_utf8_text(converted_fixture):
    with edgemoe.load(converted_fixture) as m:
        with pytest.raises(ConfigError, match="not valid UTF-8"):
            m.tokenize("a\udc80b")
        with pytest.raises(ConfigError, match="must be a str"):
            m.tokenize(b"abc")
