"""llama.cpp GGUF files: metadata, architecture and zero-copy tensor views.

``gguf.GGUFReader`` memory-maps the file; tensors stay quantized and are handed
to ggml in place, so a GGUF model occupies its file's pages and nothing more.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgemoe.arch import family_for_gguf
from edgemoe.arch.base import GGUFMeta, ModelSpec
from edgemoe.checkpoint.base import Weight, aligned_empty, tensor_layout
from edgemoe.checkpoint.gguf_header import check_header
from edgemoe.errors import ConfigError, ModelFileError

GGUF_MAGIC = b"GGUF"


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
    read past the end names what was being read and where the file ends."""

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
    ):
        """``backbone_only``: the file holds everything but the routed experts
        (an EdgeMoE model's backbone.gguf); ``spec``: the model's spec, when a
        manifest knows it better than llama.cpp's metadata can say."""
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
        check_header(p)
        try:
            self.reader = _CheckedReader(p, "r")
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
        self._tensors = {t.name: t for t in self.reader.tensors}
        arch = self.fields.get("general.architecture")
        if not arch:
            raise ModelFileError(p, "no general.architecture in the GGUF metadata")
        self.architecture = str(arch)
        self.family = family_for_gguf(self.architecture, self.path)
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
            layout = {n: v for n, v in layout.items() if "_exps." not in n}
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
