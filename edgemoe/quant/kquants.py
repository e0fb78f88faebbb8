"""ggml block layouts in numpy: Q2_K, Q4_K, Q6_K, Q8_0.

Quantizing is ggml's own (edgemoe.quant.ggml_quant: llama.cpp's C
quantizers, importance-weighted); here each layout is read back into its
codes, scales and offsets (ONNX export writes those) and dequantized with
ggml's own float32 operation order, so a plane ggml computes with is
reconstructed here identically.

Legend: R rows, K row length, B blocks, S sub-blocks, n values per sub-block.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgemoe.errors import ConfigError
from edgemoe.quant.types import BLOCK_TYPES, BlockType


class Codec:
    """Base of the block codecs; subclasses implement the block functions."""

    btype: ClassVar[BlockType]
    registry: ClassVar[dict[str, type[Codec]]] = {}

    def __init_subclass__(cls, name: str, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.btype = BLOCK_TYPES[name]
        Codec.registry[name] = cls

    @classmethod
    def quantize(
        cls, x: np.ndarray, weights: np.ndarray | None = None, fit: bool = True
    ) -> np.ndarray:
        """Rows ``x`` [R, K] -> block bytes [R, K / block * nbytes], by ggml's
        quantizer (edgemoe.quant.ggml_quant.quantize: ``weights`` [K] per
        column weigh a searched fit; ``fit=False``, plain rounding)."""
        from edgemoe.quant.ggml_quant import quantize

        return quantize(x, cls.btype.ggml, weights, fit=fit)

    sub: ClassVar[int]
    """Values per sub-block (one scale and offset each)."""
    zero: ClassVar[int] = 0
    """The code that means 0 before the offset (Q6_K 32, Q8_0 128 here)."""

    @classmethod
    def components(cls, raw: np.ndarray):
        """Block bytes [R, row_bytes] -> (codes uint8 [R, K], scales [R, K/sub],
        offsets [R, K/sub] or None): value = scale * (code - zero) - offset."""
        bt = cls.btype
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        r = raw.shape[0]
        codes, scale, offset = cls.components_blocks(raw.reshape(-1, bt.nbytes))
        return (
            codes.reshape(r, -1),
            scale.reshape(r, -1),
            None if offset is None else offset.reshape(r, -1),
        )

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """Block bytes [R, row_bytes] -> float32 [R, K], as ggml computes them
        (scale = d * sub-scale first, then scale * code - offset)."""
        codes, scale, offset = cls.components(raw)
        r, k = codes.shape
        q = (codes.astype(np.int16) - cls.zero).astype(np.float32)
        y = scale.reshape(r, -1, 1) * q.reshape(r, -1, cls.sub)
        if offset is not None:
            y = y - offset.reshape(r, -1, 1)
        return y.reshape(r, k)

    @classmethod
    def components_blocks(cls, raw: np.ndarray):
        raise NotImplementedError


class Q2K(Codec, name="Q2_K"):
    """256 weights: 16 sub-blocks of 16, codes 0..3, 4-bit scale and min each."""

    sub = 16

    @classmethod
    def components_blocks(cls, raw):
        b = raw.shape[0]
        d = raw[:, 80:82].copy().view(np.float16).astype(np.float32)  # [B, 1]
        dmin = raw[:, 82:84].copy().view(np.float16).astype(np.float32)
        sc = (raw[:, :16] & 0xF).astype(np.float32)
        mn = (raw[:, :16] >> 4).astype(np.float32)
        qs = raw[:, 16:80].reshape(b, 2, 1, 32)
        q = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
        # ggml: dl = d * sc, ml = min * m, y = dl * q - ml
        return q.reshape(b, 256), d * sc, dmin * mn


class Q4K(Codec, name="Q4_K"):
    """256 weights: 8 sub-blocks of 32, codes 0..15, 6-bit scale and min each."""

    sub = 32

    @classmethod
    def components_blocks(cls, raw):
        b = raw.shape[0]
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
        s = raw[:, 4:16]
        sc = np.empty((b, 8), dtype=np.uint8)
        mn = np.empty((b, 8), dtype=np.uint8)
        sc[:, :4] = s[:, 0:4] & 63
        mn[:, :4] = s[:, 4:8] & 63
        sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
        mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
        qs = raw[:, 16:].reshape(b, 4, 1, 32)
        q = (qs >> np.array([0, 4], dtype=np.uint8)[None, None, :, None]) & 0xF
        return (
            q.reshape(b, 256),
            d * sc.astype(np.float32),
            dmin * mn.astype(np.float32),
        )


class Q6K(Codec, name="Q6_K"):
    """256 weights: 16 sub-blocks of 16, codes -32..31, signed 8-bit scales."""

    sub = 16
    zero = 32

    @classmethod
    def components_blocks(cls, raw):
        b = raw.shape[0]
        ql = raw[:, :128].reshape(b, 2, 64)
        qh = raw[:, 128:192].reshape(b, 2, 32)
        sc = raw[:, 192:208].copy().view(np.int8).astype(np.float32)  # [B, 16]
        d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)  # [B, 1]
        u = np.empty((b, 2, 4, 32), dtype=np.uint8)
        u[:, :, 0] = (ql[:, :, :32] & 0xF) | (((qh >> 0) & 3) << 4)
        u[:, :, 1] = (ql[:, :, 32:] & 0xF) | (((qh >> 2) & 3) << 4)
        u[:, :, 2] = (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4)
        u[:, :, 3] = (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)
        return u.reshape(b, 256), d * sc, None  # y = d * sc * (u - 32)


class Q80(Codec, name="Q8_0"):
    """32 weights: fp16 scale, codes -127..127 (symmetric)."""

    sub = 32
    zero = 128

    @classmethod
    def components_blocks(cls, raw):
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)  # [B, 1]
        q = raw[:, 2:].copy().view(np.int8).astype(np.int16) + 128
        return q.astype(np.uint8), d, None


def codec(name: str) -> type[Codec]:
    try:
        return Codec.registry[name]
    except KeyError:
        raise ConfigError(
            f"no codec for ggml type {name!r}; have {sorted(Codec.registry)}"
        ) from None
