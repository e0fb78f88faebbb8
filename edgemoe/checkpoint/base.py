"""The reader-side view of one weight tensor, and the layout a ModelSpec implies."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgemoe.arch.base import ModelSpec

# ggml type ids (ggml.h enum ggml_type) for the float types we name directly.
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
GGML_MXFP4 = 39
"""gpt-oss's experts as stored (edgemoe.quant.mxfp4)."""
ALIGNMENT = 64
"""Byte alignment of every array we hand to ggml (it needs 32)."""


def aligned_empty(
    shape: tuple[int, ...],
    dtype: np.dtype | type,
    align: int = ALIGNMENT,
    zeros: bool = False,
) -> np.ndarray:
    """An uninitialised array whose data pointer is ``align``-aligned (4096
    for O_DIRECT buffers); ``zeros``: zero-filled by the allocator (calloc),
    whose pages large arrays only get when first touched."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (np.zeros if zeros else np.empty)(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


@dataclass(frozen=True)
class Weight:
    """One tensor as stored: ggml type, logical shape (numpy order, ``[.., N, K]``,
    i.e. ggml ``ne`` reversed) and data (float32 for F32, raw block bytes else)."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_float32(self) -> np.ndarray:
        """Dequantized copy (or the array itself for F32), shape ``self.shape``."""
        if self.qtype == GGML_F32:
            return self.data.reshape(self.shape)
        raw = self.data.view(np.uint8)
        if self.qtype == GGML_F16:
            out = raw.view(np.float16).astype(np.float32)
        elif self.qtype == GGML_BF16:
            out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            out = dequantize(raw, GGMLQuantizationType(self.qtype))
        return out.reshape(self.shape)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Float32 rows ``ids`` of a 2-D weight (embedding lookup) without
        dequantizing the whole matrix."""
        raw = self.raw_rows(ids)
        return Weight(
            self.name, self.qtype, (len(ids), self.shape[1]), raw
        ).to_float32()

    def raw_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a 2-D weight as stored, uint8 [len(ids), row
        bytes] (F32 rows as float32 [len(ids), K])."""
        n = self.shape[0]
        if self.qtype == GGML_F32:
            return self.data.reshape(self.shape)[ids]
        return self.data.view(np.uint8).reshape(n, self.nbytes // n)[ids]


@dataclass(frozen=True)
class FileWeight(Weight):
    """A weight left in its file (``data`` is empty): rows are read with
    ``pread`` when asked for. An embedding table then costs memory only for
    the rows a context uses, and no mapping can SIGBUS if the file shrinks."""

    path: str = ""
    offset: int = 0
    size: int = 0

    @property
    def nbytes(self) -> int:
        return self.size

    def _read(self, spans: list[tuple[int, int]]) -> np.ndarray:
        from edgemoe.checkpoint.files import opened
        from edgemoe.errors import ModelFileError

        out = np.empty(sum(n for _, n in spans), np.uint8)
        with opened(self.path, os.O_NOFOLLOW) as fd:
            pos = 0
            for start, n in spans:
                if os.preadv(fd, [memoryview(out)[pos : pos + n]], start) != n:
                    raise ModelFileError(
                        self.path,
                        f"truncated: {self.name!r} needs bytes {start}..{start + n}",
                    )
                pos += n
        return out

    def _as(self, shape: tuple[int, ...], raw: np.ndarray) -> Weight:
        data = raw.view(np.float32) if self.qtype == GGML_F32 else raw
        return Weight(self.name, self.qtype, shape, data)

    def to_float32(self) -> np.ndarray:
        return self._as(self.shape, self._read([(self.offset, self.size)])).to_float32()

    def raw_rows(self, ids: np.ndarray) -> np.ndarray:
        rows = FileRows(self)
        try:
            return rows.raw_rows(ids).copy()
        finally:
            rows.close()


class FileRows:
    """A FileWeight's rows through one fd held open, into one reused buffer:
    a decode step reads a row per token, and opening the file (and building
    arrays) for each cost more than the read. The fd keeps reading the file
    it opened if the path is replaced."""

    def __init__(self, w: FileWeight):
        from edgemoe.checkpoint.files import open_regular

        self.w = w
        self.row = w.size // w.shape[0]
        self.fd: int | None = open_regular(w.path, os.O_NOFOLLOW)
        self._buf = np.empty((0, self.row), np.uint8)

    def raw_rows(self, ids: np.ndarray) -> np.ndarray:
        """As ``Weight.raw_rows``; valid until the next call."""
        from edgemoe.errors import ModelFileError

        w, row = self.w, self.row
        if self.fd is None:
            raise ValueError(f"rows of {w.name!r} read after close()")
        if len(self._buf) != len(ids):
            self._buf = aligned_empty((len(ids), row), np.uint8)
        for j, i in enumerate(ids.tolist()):
            start = w.offset + i * row
            try:
                got = os.preadv(self.fd, [self._buf[j]], start)
            except OSError as e:
                raise ModelFileError(
                    w.path, f"cannot read: {e.strerror or e}"
                ) from None
            if got != row:
                raise ModelFileError(
                    w.path, f"truncated: {w.name!r} needs bytes {start}..{start + row}"
                )
        return self._buf.view(np.float32) if w.qtype == GGML_F32 else self._buf

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a model that failed to load never closes it
        self.close()


class Checkpoint(Protocol):
    """What the runtime and converters read from any source format."""

    path: str
    spec: ModelSpec
    architecture: str

    def names(self) -> list[str]: ...
    def load(self, name: str) -> Weight: ...
    def close(self) -> None: ...


def load_expert(ckpt, name: str, e: int) -> Weight:
    """Expert ``e`` [N, K] of ``ckpt``'s stacked expert tensor ``name``: the
    checkpoint's own per-expert read where it has one (HF files), else a
    slice of the stack (a GGUF's is a view of its mapping)."""
    own = getattr(ckpt, "load_expert", None)
    if own is not None:
        return own(name, e)
    w = ckpt.load(name)
    data = w.data
    if isinstance(w, FileWeight):  # left in its file: read it, then slice
        data = w._as(w.shape, w._read([(w.offset, w.size)])).data
    return Weight(name, w.qtype, w.shape[1:], data.reshape(*w.shape[:2], -1)[e])


def is_expert_matrix(name: str) -> bool:
    """A routed experts' stacked matrix (``blk.N.ffn_*_exps.weight``), what a
    converted model stores as planes; their biases are backbone."""
    return name.endswith("_exps.weight")


def tensor_layout(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor a model of ``spec`` has: internal name -> (shape, required)."""
    d, v, hd = spec.n_embd, spec.n_vocab, spec.head_dim
    q_dim, kv_dim = spec.n_head * hd, spec.n_head_kv * hd
    out: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((v, d), True),
        "output_norm.weight": ((d,), True),
    }
    if not spec.tie_embeddings:
        out["output.weight"] = ((v, d), True)
    for i, moe in enumerate(spec.moe_layers):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = ((d,), True)
        if spec.attention == "mla":
            out.update(_mla_layout(spec, b))
        else:
            out.update(
                {
                    b + "attn_q.weight": ((q_dim, d), True),
                    b + "attn_k.weight": ((kv_dim, d), True),
                    b + "attn_v.weight": ((kv_dim, d), True),
                    b + "attn_output.weight": ((d, q_dim), True),
                    b + "attn_q.bias": ((q_dim,), spec.attn_bias),
                    b + "attn_k.bias": ((kv_dim,), spec.attn_bias),
                    b + "attn_v.bias": ((kv_dim,), spec.attn_bias),
                    b + "attn_output.bias": ((d,), spec.attn_bias),
                }
            )
        out[b + "ffn_norm.weight"] = ((d,), True)
        if spec.attn_sinks:
            out[b + "attn_sinks.weight"] = ((spec.n_head,), True)
        if spec.qk_norm == "head":
            out[b + "attn_q_norm.weight"] = ((hd,), True)
            out[b + "attn_k_norm.weight"] = ((hd,), True)
        elif spec.qk_norm == "full":
            out[b + "attn_q_norm.weight"] = ((q_dim,), True)
            out[b + "attn_k_norm.weight"] = ((kv_dim,), True)
        if moe:
            e, f = spec.n_expert, spec.expert_ffn
            out[b + "ffn_gate_inp.weight"] = ((e, d), True)
            out[b + "ffn_gate_exps.weight"] = ((e, f, d), True)
            out[b + "ffn_up_exps.weight"] = ((e, f, d), True)
            out[b + "ffn_down_exps.weight"] = ((e, d, f), True)
            if spec.router == "sigmoid_topk":  # DeepSeek-V3's selection bias
                out[b + "exp_probs_b.bias"] = ((e,), True)
            if spec.moe_bias:
                out[b + "ffn_gate_inp.bias"] = ((e,), True)
                out[b + "ffn_gate_exps.bias"] = ((e, f), True)
                out[b + "ffn_up_exps.bias"] = ((e, f), True)
                out[b + "ffn_down_exps.bias"] = ((e, d), True)
            if spec.shared_expert_ffn:
                s = spec.shared_expert_ffn
                out[b + "ffn_gate_shexp.weight"] = ((s, d), True)
                out[b + "ffn_up_shexp.weight"] = ((s, d), True)
                out[b + "ffn_down_shexp.weight"] = ((d, s), True)
                if spec.shared_expert_gated:
                    out[b + "ffn_gate_inp_shexp.weight"] = ((d,), True)
        else:
            f = spec.dense_ffn
            out[b + "ffn_gate.weight"] = ((f, d), True)
            out[b + "ffn_up.weight"] = ((f, d), True)
            out[b + "ffn_down.weight"] = ((d, f), True)
    return out


def _mla_layout(spec: ModelSpec, b: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """DeepSeek's latent attention, in llama.cpp's names: the query (full or
    low-rank), the joint latent-and-RoPE-key projection, and the latent's
    per-head expansions to keys (``attn_k_b`` [H, kv_lora, nope]) and values
    (``attn_v_b`` [H, v, kv_lora])."""
    d, h, r = spec.n_embd, spec.n_head, spec.head_dim
    nope, lora, v = spec.qk_nope_dim, spec.kv_lora_rank, spec.v_head_dim
    out = {}
    if spec.q_lora_rank:
        q = spec.q_lora_rank
        out[b + "attn_q_a.weight"] = ((q, d), True)
        out[b + "attn_q_a_norm.weight"] = ((q,), True)
        out[b + "attn_q_b.weight"] = ((h * (nope + r), q), True)
    else:
        out[b + "attn_q.weight"] = ((h * (nope + r), d), True)
    out[b + "attn_kv_a_mqa.weight"] = ((lora + r, d), True)
    out[b + "attn_kv_a_norm.weight"] = ((lora,), True)
    out[b + "attn_k_b.weight"] = ((h, lora, nope), True)
    out[b + "attn_v_b.weight"] = ((h, v, lora), True)
    out[b + "attn_output.weight"] = ((d, h * v), True)
    return out
