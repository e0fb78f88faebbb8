"""Opening the files of a model directory without being led astray.

A model directory comes from elsewhere (a download, a colleague's disk), so
what it names is input like any other: a manifest entry ``/etc/passwd`` or
``../x`` must not make ``inspect --verify`` hash a file outside it, a FIFO
where a JSON file belongs must not block the process forever, and a JSON
file nested ten thousand deep or holding ``NaN`` must not reach the parser's
recursion limit or a range check as a float that compares false to all.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgemoe.errors import ModelFileError

MAX_JSON_BYTES = 256 << 20
"""A 48-layer, 128-expert manifest is a few MiB and tokenizer.json tens."""
MAX_JSON_DEPTH = 64
"""The deepest our own files go is 5 (manifest experts)."""


def plain_name(name: Any, what: str, where: str | Path) -> str:
    """``name`` if it names a file directly inside a directory: a non-empty
    string with no path separator, NUL, or ``.``/``..``."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
    ):
        raise ModelFileError(
            where,
            f"{what} must be a plain file name inside the model directory, "
            f"got {name!r}",
        )
    return name


def member(root: str | Path, name: str, what: str) -> os.stat_result:
    """The stat of regular file ``name`` inside ``root``. A symlink may point
    elsewhere inside ``root`` but not out of it."""
    root = Path(root)
    path = root / plain_name(name, what, root)
    try:
        if path.is_symlink():
            real_root = os.path.realpath(root)
            target = os.path.realpath(path)
            if os.path.commonpath([real_root, target]) != real_root:
                raise ModelFileError(
                    path, f"{what} is a symlink out of the model directory ({target})"
                )
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(path, f"missing ({what})") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(path, f"{what} is not a regular file")
    return st


def open_regular(path: str | Path, flags: int = 0) -> int:
    """A read-only fd of regular file ``path`` (the caller closes it); a FIFO,
    device or directory is refused without blocking on it, and OSErrors
    become ModelFileErrors."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot open: {e.strerror or e}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as e:
        os.close(fd)
        raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None
    if not regular:
        os.close(fd)
        raise ModelFileError(path, "not a regular file")
    return fd


@contextmanager
def opened(path: str | Path, flags: int = 0) -> Iterator[int]:
    """``open_regular`` for a ``with`` block; read errors become
    ModelFileErrors too."""
    fd = open_regular(path, flags)
    try:
        yield fd
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of regular file ``path`` (at most ``limit``)."""
    with opened(path) as fd:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ModelFileError(
                path, f"{size} bytes, more than the {limit}-byte limit"
            )
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES, nan: bool = False) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity (unless ``nan``: a config.json's
    NaN is then refused by the field's own check, which names it), at most
    ``MAX_JSON_DEPTH`` deep."""
    return parse_json(read_regular(path, limit), path, nan)


def parse_json(raw: bytes, path: str | Path, nan: bool = False) -> Any:
    """``read_json`` for bytes already read (a safetensors header)."""
    constant = (lambda c: float(c)) if nan else _reject_constant
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except RecursionError:
        raise ModelFileError(path, "not valid JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise ModelFileError(path, "not valid JSON: not UTF-8") from None
    except ValueError as e:  # JSONDecodeError, NaN, an integer of 4,300+ digits
        raise ModelFileError(path, f"not valid JSON: {e}") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise ModelFileError(
            path, f"not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels"
        )
    return data


def _depth(data: Any) -> int:
    """Nesting depth, without recursion (the parser may accept deeper than
    Python can recurse)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest
