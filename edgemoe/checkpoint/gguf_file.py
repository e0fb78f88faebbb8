"""llama.cpp GGUF files: metadata, architecture and zero-copy tensor views.

``gguf.GGUFReader`` memory-maps the file; tensors stay quantized and are handed
to ggml in place, so a GGUF model occupies its file's pages and nothing more.
A converted model's backbone is read into memory instead (``in_memory``): its
file can then change under a running model without taking the process down.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgemoe.arch import family_for_gguf
from edgemoe.arch.base import GGUFMeta, ModelSpec
from edgemoe.checkpoint.base import (
    FileWeight,
    Weight,
    aligned_empty,
    is_expert_matrix,
    tensor_layout,
)
from edgemoe.checkpoint.files import opened
from edgemoe.checkpoint.gguf_header import check_header
from edgemoe.errors import ConfigError, ModelFileError

GGUF_MAGIC = b"GGUF"
_NO_DATA = np.empty(0, np.uint8)


def is_gguf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


# ``{arch}.*`` sizes the families divide by or allocate with; checked up front
# so a zero or a string is named here, not a ZeroDivisionError in a family.
_POSITIVE_INTS = (
    "context_length",
    "embedding_length",
    "block_count",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "vocab_size",
)


class _BadGGUF(Exception):
    """The GGUF's own tables ask for bytes or types the file does not have."""


class _CheckedReader(GGUFReader):
    """``GGUFReader`` with bounds checks. gguf-py slices its memmap unchecked, so a
    short file fails deep in numpy ("cannot reshape array of size ..."); here a
    read past the end names what was being read and where the file ends.

    ``buffer``: the file's bytes already in memory. gguf-py maps the file in
    its constructor; the ``data`` setter swaps that mapping for the buffer, so
    every field and tensor is a view of memory the file no longer backs."""

    def __init__(self, path, mode="r", buffer: np.ndarray | None = None):
        self._buffer = buffer
        super().__init__(path, mode)

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value if self._buffer is None else self._buffer

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            raise _BadGGUF(
                f"truncated: the header needs byte {end}, "
                f"file has {self.data.size} bytes"
            )
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            except (ValueError, KeyError):
                raise _BadGGUF(
                    f"tensor {name!r} has unknown ggml type {int(raw_type[0])}"
                ) from None
            n_bytes = math.prod(int(d) for d in dims) * size // block
            end = int(start_offs) + int(offset[0]) + n_bytes
            if end > self.data.size:
                raise _BadGGUF(
                    f"truncated: tensor {name!r} ends at byte {end}, "
                    f"file has {self.data.size} bytes"
                )
        super()._build_tensors(start_offs, fields)


_READ_CHUNK = 64 << 20


def read_into_memory(path: Path, skip: tuple[int, int] | None = None) -> np.ndarray:
    """The whole file in anonymous, page-aligned memory, but for the bytes
    ``skip`` = (start, end), left unread and so never committed.

    A mapped file that another process truncates kills the process reading it
    with SIGBUS, inside ggml where no Python handler can run; memory that was
    read cannot shrink. The page cache each chunk passed through is dropped
    after it is copied, so loading never holds the file twice."""
    with opened(path) as fd:
        size = os.fstat(fd).st_size
        buf = aligned_empty((size,), np.uint8, 4096)
        view = memoryview(buf)
        pos = 0
        while pos < size:
            if skip and skip[0] <= pos < skip[1]:
                pos = skip[1]
                continue
            end = min(pos + _READ_CHUNK, skip[0] if skip and pos < skip[0] else size)
            n = os.preadv(fd, [view[pos:end]], pos)
            if n == 0:
                raise ModelFileError(
                    path, f"truncated while being read: {pos} of {size} bytes"
                )
            os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)
            pos += n
        return buf


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:
        return None


class GGUFCheckpoint:
    """A GGUF model file as written by llama.cpp's converters (or ours)."""

    def __init__(
        self,
        path: str | Path,
        backbone_only: bool = False,
        spec: ModelSpec | None = None,
        in_memory: bool = False,
    ):
        """``backbone_only``: the file holds everything but the routed experts
        (an EdgeMoE model's backbone.gguf); ``spec``: the model's spec, when a
        manifest knows it better than llama.cpp's metadata can say;
        ``in_memory``: read the file instead of mapping it (then truncating it
        while a model runs cannot crash the process)."""
        self._backbone_only = backbone_only
        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise ModelFileError(p, "file not found")
        if p.is_dir():
            raise ModelFileError(p, "is a directory, expected a .gguf file")
        if not p.is_file():  # a FIFO would block the open below forever
            raise ModelFileError(p, "not a regular file, expected a .gguf file")
        try:
            with open(p, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise ModelFileError(p, f"cannot open: {e.strerror}") from None
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                p, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})"
            )
        # Counts the file cannot hold are refused before gguf-py allocates
        # arrays for them (a FIFO or device was refused by is_dir/open above).
        header = check_header(p)
        buffer, self._unread = None, {}
        if in_memory:
            # The embedding table is read a row per token (FileWeight): a
            # vocabulary of rows most contexts never touch stays on disk. Tied
            # to the output head it is read whole every token, so it is loaded.
            embd = header.tensors.get("token_embd.weight")
            tied = "output.weight" not in header.tensors or (
                spec is not None and spec.tie_embeddings
            )
            if embd is not None and not tied:
                self._unread["token_embd.weight"] = embd
            skip = (embd[0], embd[0] + embd[1]) if self._unread else None
            buffer = read_into_memory(p, skip)
        try:
            self.reader = _CheckedReader(p, "r", buffer)
        except _BadGGUF as e:
            raise ModelFileError(p, str(e)) from None
        except (ValueError, IndexError, OSError, KeyError, OverflowError) as e:
            raise ModelFileError(p, f"corrupt GGUF: {e}") from None
        self.fields: dict[str, Any] = {
            k: _field_value(f)
            for k, f in self.reader.fields.items()
            if not k.startswith("tokenizer.ggml.")
            or k.endswith("_id")
            or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre")
        }
        arch = self.fields.get("general.architecture")
        if not arch:
            raise ModelFileError(p, "no general.architecture in the GGUF metadata")
        self.architecture = str(arch)
        self.family = family_for_gguf(self.architecture, self.path)
        self._tensors = {
            self.family.from_gguf_name(t.name): t for t in self.reader.tensors
        }
        n_tokens = (
            len(self.reader.fields["tokenizer.ggml.tokens"].data)
            if ("tokenizer.ggml.tokens" in self.reader.fields)
            else None
        )
        fields = dict(self.fields)
        if n_tokens is not None:
            fields["tokenizer.ggml.tokens"] = range(n_tokens)  # only its length is read
        for key in _POSITIVE_INTS:
            v = fields.get(f"{self.architecture}.{key}")
            if v is not None and (
                not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0
            ):
                raise ModelFileError(
                    p,
                    f"metadata {self.architecture}.{key} must be a positive "
                    f"integer, got {v!r}",
                )
        try:
            if spec is None:
                spec = self.family.spec_from_gguf(
                    GGUFMeta(self.architecture, fields, self.path)
                )
        except ConfigError as e:
            # A value the shared checks refuse (edgemoe/arch/validate.py); a
            # ModelFileError like every other fault in a GGUF's metadata.
            msg = str(e).removeprefix(f"{self.path}: ")
            raise ModelFileError(
                p, f"bad {self.architecture}.* metadata: {msg}"
            ) from None
        except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
            # A metadata value of the wrong type or zero (head_count = 0 ...).
            raise ModelFileError(
                p,
                f"bad {self.architecture}.* metadata: {type(e).__name__}: {e}",
            ) from None
        if "output.weight" not in self._tensors and not spec.tie_embeddings:
            spec = dataclasses.replace(spec, tie_embeddings=True)
        self.spec = spec
        self._check_layout()

    def _layout(self) -> dict:
        layout = tensor_layout(self.spec)
        if self._backbone_only:
            layout = {n: v for n, v in layout.items() if not is_expert_matrix(n)}
        return layout

    def _check_layout(self) -> None:
        layout = self._layout()
        missing = [
            n for n, (_, req) in layout.items() if req and n not in self._tensors
        ]
        if missing:
            raise ModelFileError(
                self.path, f"missing tensors: {', '.join(missing[:5])}"
            )
        for name, t in self._tensors.items():
            if name not in layout:
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            want = layout[name][0]
            if shape != want:
                raise ModelFileError(
                    self.path,
                    f"tensor {name!r} has shape {list(shape)}, expected {list(want)}",
                )

    def names(self) -> list[str]:
        layout = self._layout()
        return [n for n in self._tensors if n in layout]

    def info(self, name: str) -> tuple[str, tuple[int, ...], int]:
        """(ggml type name, shape, stored bytes) without reading the data."""
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return t.tensor_type.name, shape, int(t.n_bytes)

    @property
    def mmap(self) -> np.ndarray:
        """The whole mapped file: one host buffer covers every tensor."""
        return self.reader.data

    def load(self, name: str) -> Weight:
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if name in self._unread:
            return FileWeight(
                name,
                int(t.tensor_type),
                shape,
                _NO_DATA,
                self.path,
                int(t.data_offset),
                int(t.n_bytes),
            )
        data = t.data
        if data.ctypes.data % 32:
            # general.alignment below 32: copy, ggml needs 32-byte aligned data.
            copy = aligned_empty(data.shape, data.dtype)
            copy[...] = data
            data = copy
        if int(t.tensor_type) != 0:
            data = data.view(np.uint8)
        return Weight(name, int(t.tensor_type), shape, data)

    def tokenizer_fields(self) -> dict[str, Any]:
        """Every ``tokenizer.*`` key, for writers that carry the vocabulary over."""
        return {
            k: _field_value(f)
            for k, f in self.reader.fields.items()
            if k.startswith("tokenizer.")
        }

    def close(self) -> None:
        mm = getattr(self.reader.data, "_mmap", None)
        self._tensors.clear()
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass
