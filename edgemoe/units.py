"""Memory sizes as users write them ("3GiB", "800MiB") and as we print them."""

from __future__ import annotations

import re

from edgemoe.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}


MAX_SIZE = 2**60
"""An exbibyte: larger is a typo, and would overflow C sizes downstream."""


_BAD_SIZE = "a memory size must be positive and below 2**60 bytes, got "


def parse_size(value: str | int | float) -> int:
    """``"3GiB"``, ``"1.5 GB"``, ``"800M"`` or a byte count -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"a memory size must be bytes or like '3GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not (0 < value < MAX_SIZE):  # also False for NaN
            raise ConfigError(_BAD_SIZE + _short(value))
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot read memory size {value!r}; use e.g. 3GiB, 1500MiB, 2.5GB or bytes"
        )
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]  # 400 digits: inf
    if not (0 < n < MAX_SIZE):
        raise ConfigError(_BAD_SIZE + _short(value))
    return int(n)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def mib(n: float) -> str:
    """Whole MiB, as the command line prints sizes: "1,335 MiB"."""
    return f"{n / 2**20:,.0f} MiB"


def mib_up(n: float) -> str:
    """A budget in whole MiB, rounded up so that it is enough as typed:
    "1,601 MiB"."""
    return f"{-(-int(n) // 2**20):,} MiB"


def budget_flag(n: int) -> str:
    """``--budget`` for at least ``n`` bytes, as a user types it."""
    return f"--budget {-(-int(n) // 2**20)}MiB"


def fmt_size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
