"""A GGUF header walked and bounded before any reader allocates for it.

gguf-py's reader builds numpy arrays for every count a header states: a
tensor count of 4 million or a string turned into a million-element array
cost it 0.6-1.3 GB before anything was rejected, and llama.cpp's own loader
trusts the same counts. ``check_header`` reads the header with ``struct``
alone and refuses, with the offset and what was expected, any count or
length the file's remaining bytes cannot hold, any unknown value type, a
nested array, and tensor infos ggml could not represent.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgemoe.checkpoint.files import opened
from edgemoe.errors import ModelFileError

# Value type -> fixed size (None: string; 9, array, is handled apart).
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: None, 10: 8, 11: 8, 12: 8}
_ARRAY = 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY = 1 << 24
"""Elements in one metadata array: vocabularies are ~10^5-10^6."""
MAX_KEY = 1 << 16
_PREFIX = 1 << 20


class _Short(Exception):
    """The walk needs bytes past the prefix read so far (but inside the file)."""


@dataclass(frozen=True)
class Header:
    """Where a GGUF's tensors lie: name -> (absolute offset, bytes). Tensors of
    a type gguf-py does not know are left out (the reader names them)."""

    tensors: dict[str, tuple[int, int]]


class _Walker:
    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.alignment = 32

    def fail(self, problem: str) -> ModelFileError:
        where = f"corrupt GGUF header at byte {self.pos}"
        return ModelFileError(self.path, f"{where}: {problem}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError(
                self.path,
                f"truncated: the header needs byte {self.pos + n} for {what}, "
                f"the file has {self.size} bytes",
            )

    def have(self, n: int, what: str) -> None:
        """``need`` for bytes about to be read: they must be in the prefix."""
        self.need(n, what)
        if self.pos + n > len(self.buf):
            raise _Short

    def text(self, what: str) -> str:
        start = self.string(what, MAX_KEY, read=True)
        return bytes(self.buf[start : self.pos]).decode("utf-8", "replace")

    def u32(self, what: str) -> int:
        self.have(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.have(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, limit: int | None = None, read: bool = False) -> int:
        n = self.u64(f"{what}'s length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} of {n} bytes (at most {limit})")
        (self.have if read else self.need)(n, what)
        start = self.pos
        self.pos += n
        return start

    def value(self, vtype: int, what: str) -> None:
        if vtype == _ARRAY:
            etype = self.u32(f"{what}'s element type")
            count = self.u64(f"{what}'s element count")
            if etype == _ARRAY:
                raise self.fail(f"{what} is an array of arrays")
            if etype not in _SIZES:
                raise self.fail(f"{what} has unknown element type {etype}")
            if count > MAX_ARRAY:
                raise self.fail(f"{what} has {count} elements (at most {MAX_ARRAY})")
            size = _SIZES[etype]
            if size is not None:
                self.need(count * size, f"{what}'s {count} elements")
                self.pos += count * size
                return
            # Each string has at least its 8-byte length: bound first, then walk.
            self.need(count * 8, f"{what}'s {count} strings")
            for _ in range(count):
                self.string(f"a string in {what}")
            return
        size = _SIZES.get(vtype, -1)
        if size == -1:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if size is None:
            self.string(what)
        else:
            self.need(size, what)
            self.pos += size


def check_header(path: str | Path) -> Header:
    """Raise a ModelFileError for a GGUF header whose counts, lengths or
    types its file cannot hold; otherwise say where its tensors lie.

    The header is read with ``pread`` into a prefix that grows until it holds
    the header: nothing is mapped, so a file that shrinks meanwhile is a short
    read, not a SIGBUS."""
    path = str(path)
    with opened(path) as fd:
        size = os.fstat(fd).st_size
        if size < 24:
            raise ModelFileError(
                path,
                f"truncated: the header needs byte 24, the file has {size} bytes",
            )
        n = min(size, _PREFIX)
        while True:
            buf = os.pread(fd, n, 0)
            if len(buf) < n:
                raise ModelFileError(path, "truncated while being read")
            try:
                return _walk(_Walker(buf, size, path))
            except _Short:
                n = min(size, n * 4)


def _walk(w: _Walker) -> Header:
    w.need(4, "magic")
    if bytes(w.buf[:4]) != b"GGUF":
        raise w.fail("no GGUF magic")
    w.pos = 4
    version = w.u32("version")
    if version not in (2, 3):
        raise w.fail(f"version {version} (EdgeMoE reads GGUF v2 and v3)")
    n_tensors = w.u64("tensor count")
    n_kv = w.u64("metadata count")
    # A key-value pair takes at least 8 + 1 + 4 + 1 bytes, a tensor info
    # 8 + 1 + 4 + 8 + 4 + 8: counts the file cannot hold are refused now.
    w.need(n_kv * 14, f"{n_kv} metadata entries")
    for i in range(n_kv):
        name = w.text(f"metadata key {i}")
        vtype = w.u32(f"{name!r}'s type")
        if name == "general.alignment" and vtype == 4:
            w.alignment = w.u32(name)
        else:
            w.value(vtype, f"metadata {name!r}")
    if not 1 <= w.alignment <= 1 << 30 or w.alignment & (w.alignment - 1):
        raise w.fail(f"general.alignment {w.alignment} is not a power of two")
    w.need(n_tensors * 33, f"{n_tensors} tensor infos")
    infos = []
    for i in range(n_tensors):
        name = w.text(f"tensor {i}'s name")
        n_dims = w.u32(f"tensor {i}'s dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {i} has {n_dims} dimensions (1..{MAX_DIMS})")
        count = 1
        for d in range(n_dims):
            dim = w.u64(f"tensor {i}'s dimension {d}")
            if dim == 0 or dim >= 1 << 40:
                raise w.fail(f"tensor {i}'s dimension {d} is {dim}")
            count *= dim
        if count >= 1 << 48:
            raise w.fail(f"tensor {i} has {count} elements")
        qtype = w.u32(f"tensor {i}'s type")
        infos.append((name, qtype, count, w.u64(f"tensor {i}'s offset")))
    start = -(-w.pos // w.alignment) * w.alignment
    tensors = {}
    for name, qtype, count, offset in infos:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            continue
        tensors[name] = (start + offset, count // block * size)
    return Header(tensors)
