"""Safetensors reading without torch: header parse, mmap, bf16 widened from raw bits.

The format is an 8-byte little-endian header length, a JSON header mapping tensor
names to ``{dtype, shape, data_offsets}``, then the raw bytes. ``safe_open`` with
``framework="np"`` cannot return bf16, so we parse the header ourselves.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.checkpoint.files import parse_json
from edgemoe.errors import ModelFileError

# numpy dtype per safetensors dtype; BF16 is read as uint16 and widened.
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def bf16_to_f32(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Widen bf16 bit patterns (uint16) to float32 by moving them to the high
    half, into ``out`` (contiguous float32 of ``raw``'s size) if given.

    By ggml's row converter where the binding loads (the same bits, 2x
    faster, and no uint32 temporary); numpy's shift otherwise."""
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    from edgemoe.ggml_binding import BF16, row_to_float

    fn = row_to_float(BF16)
    src = np.ascontiguousarray(raw, dtype=np.uint16)
    if fn is not None and out.flags.c_contiguous and out.size == src.size:
        if out.size:
            fn(src.ctypes.data, out.ctypes.data, out.size)
        return out
    np.left_shift(src.astype(np.uint32).reshape(out.shape), 16, out=out.view(np.uint32))
    return out


def _index(x: object) -> bool:
    return type(x) is int and 0 <= x < 1 << 48


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; tensors are read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            raise ModelFileError(self.path, "file not found") from None
        except OSError as e:
            raise ModelFileError(self.path, f"cannot open: {e.strerror}") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise ModelFileError(self.path, "truncated: no safetensors header")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise ModelFileError(
                    self.path,
                    f"not a safetensors file or truncated: header length {hlen} "
                    f"but file is {size} bytes",
                )
            try:  # depth-capped: a 100,000-deep array was a RecursionError
                header = parse_json(fh.read(hlen), self.path)
            except ModelFileError as e:
                raise ModelFileError(
                    self.path, f"corrupt safetensors header: {e.problem}"
                ) from None
            self._mm = (
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            )
        if not isinstance(header, dict):
            raise ModelFileError(self.path, "corrupt safetensors header: not an object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_start = 8 + hlen
        for name, info in header.items():
            self.tensors[name] = self._check(name, info, data_start, size)

    def _check(self, name: str, info: object, start: int, size: int) -> TensorInfo:
        try:
            dtype, shape = info["dtype"], tuple(info["shape"])
            b, e = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ModelFileError(
                self.path, f"tensor {name!r}: malformed header entry"
            ) from None
        # Plain non-negative ints only: int() would take 1.5, True and "3",
        # and numpy's product of huge dims wraps around to a size that fits.
        if not all(_index(x) for x in (*shape, b, e)) or len(shape) > 8:
            raise ModelFileError(
                self.path,
                f"tensor {name!r}: shape and data_offsets must be integers "
                f"in 0..2**48, got {str(info)[:80]}",
            )
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ModelFileError(
                self.path, f"tensor {name!r}: unsupported dtype {str(dtype)[:40]}"
            )
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if e - b != math.prod(shape) * itemsize or not 0 <= b <= e:
            raise ModelFileError(
                self.path,
                f"tensor {name!r}: {e - b} bytes do not hold {dtype}{list(shape)}",
            )
        if start + e > size:
            raise ModelFileError(
                self.path,
                f"truncated: tensor {name!r} ends at byte {start + e}, "
                f"file has {size} bytes",
            )
        return TensorInfo(name, dtype, shape, start + b, start + e)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor's stored values (bf16 as uint16)."""
        t = self.tensors[name]
        return np.frombuffer(
            self._mm,
            dtype=_DTYPES[t.dtype],
            count=(t.end - t.begin) // np.dtype(_DTYPES[t.dtype]).itemsize,
            offset=t.begin,
        ).reshape(t.shape)

    def float32(self, name: str) -> np.ndarray:
        """A tensor as float32 (a copy for bf16/f16, a read-only view for f32)."""
        t = self.tensors[name]
        raw = self.raw(name)
        if t.dtype == "BF16":
            return bf16_to_f32(raw)
        if t.dtype == "F32":
            return raw
        if t.dtype in ("F16", "F64"):
            return raw.astype(np.float32)
        raise ModelFileError(
            self.path, f"tensor {name!r}: {t.dtype} is not a float type"
        )

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process once it has been copied, so
        loading never holds the stored and the widened copy of the whole model."""
        t = self.tensors[name]
        if self._mm is None or t.end == t.begin:
            return
        start = t.begin - t.begin % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, t.end - start)
        except (AttributeError, OSError, ValueError):
            pass  # no madvise on this platform: the pages stay until close

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # Views handed out still reference the map; the GC closes it later.
                pass


def write_safetensors(
    path: str | os.PathLike,
    tensors: list[tuple[str, str, tuple[int, ...], object]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream tensors to a safetensors file: ``(name, dtype, shape, produce)``
    where ``produce()`` returns the raw bytes; one tensor is in memory at a time.
    Written under a temporary name and renamed, so a failure leaves no file."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name, _, _, produce in tensors:
                data = produce()
                want = header[name]["data_offsets"]
                if len(data) != want[1] - want[0]:
                    raise ValueError(f"tensor {name!r}: produced {len(data)} bytes")
                fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
