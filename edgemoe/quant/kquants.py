"""ggml block codecs in numpy: Q2_K, Q4_K, Q6_K, Q8_0.

Each codec packs bytes exactly as ggml lays them out (ggml-common.h) and
dequantizes with ggml's own float32 operation order, so a plane we write is
computed by ggml's kernels and reconstructed here identically. Quantization
is an importance-weighted fit per sub-block (weights = mean squared input
activation per column, an "imatrix"), in the spirit of llama.cpp's
make_qkx2_quants, vectorised over all sub-blocks of a tensor.

Legend: R rows, K row length, B blocks, S sub-blocks, n values per sub-block.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgemoe.errors import ConfigError
from edgemoe.quant.types import BLOCK_TYPES, BlockType

F16_MAX = 65504.0


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 (as stored) and back to float32."""
    return np.clip(x, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)


def _round(x: np.ndarray) -> np.ndarray:
    # ggml's nearest_int rounds half away from zero; np.rint rounds to even.
    return np.trunc(x + np.copysign(np.float32(0.5), x))


class Codec:
    """Base of the block codecs; subclasses implement the block functions."""

    btype: ClassVar[BlockType]
    registry: ClassVar[dict[str, type[Codec]]] = {}

    def __init_subclass__(cls, name: str, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.btype = BLOCK_TYPES[name]
        Codec.registry[name] = cls

    @classmethod
    def quantize(cls, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Rows ``x`` [R, K] -> block bytes [R, K / block * nbytes].

        ``weights`` ([K] per column, or [R, K]) weigh the squared error.
        """
        bt = cls.btype
        if x.ndim != 2 or x.shape[1] % bt.block:
            raise ConfigError(
                f"{bt.name} needs rows of a multiple of {bt.block} values, "
                f"got shape {list(x.shape)}"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ConfigError(f"{bt.name}: the tensor has NaN or infinite values")
        r, k = x.shape
        if weights is None:
            w = np.ones_like(x)
        else:
            w = np.broadcast_to(np.asarray(weights, dtype=np.float32), x.shape)
            # A column never activated still needs a sane fit: floor the weights.
            w = np.maximum(w, np.float32(1e-8) * max(float(w.mean()), 1e-30))
        blocks = cls.quantize_blocks(
            x.reshape(-1, bt.block), np.ascontiguousarray(w).reshape(-1, bt.block)
        )
        return blocks.reshape(r, k // bt.block * bt.nbytes)

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
    def quantize_blocks(cls, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def components_blocks(cls, raw: np.ndarray):
        raise NotImplementedError


def rowsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis as a BLAS matvec: ~8x faster than ``sum(axis=1)``
    on the short rows (16-32 values) sub-blocks have."""
    return a @ np.ones(a.shape[-1], dtype=a.dtype)


def fit_min_scale(
    x: np.ndarray, w: np.ndarray, nmax: int, steps: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted fit of ``x ~ s*q - m`` (q in 0..nmax, s >= 0, m >= 0) per row.

    Tries ``steps`` grids around the min/max one, refits (s, m) by weighted
    least squares for each, keeps the best. Returns float ``s`` and ``m`` [S].
    The error of a fit is expanded in the weighted moments, so each trial
    costs one pass for the codes and one for the moments.
    """
    lo = np.minimum(x.min(axis=1), 0.0)  # [S]
    hi = x.max(axis=1)
    span = np.maximum(hi - lo, np.float32(1e-30))
    wx = w * x
    sw, sx, sxx = rowsum(w), rowsum(wx), rowsum(wx * x)
    shifted = x - lo[:, None]  # >= 0
    best_err = np.full(x.shape[0], np.inf, dtype=np.float32)
    best_s = span / nmax
    best_m = -lo
    for delta in np.linspace(-1.0, 1.0, steps, dtype=np.float32):
        iscale = (nmax + delta) / span
        q = np.minimum(np.floor(shifted * iscale[:, None] + 0.5), nmax)  # [S, n]
        wq = w * q
        sq, sqq, sqx = rowsum(wq), rowsum(wq * q), rowsum(wq * x)
        det = sw * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(det > 0, (sw * sqx - sq * sx) / det, 0.0)
            b = np.where(det > 0, (sqq * sx - sq * sqx) / det, 0.0)
            # The offset must be <= 0 (stored as a subtracted min).
            pos = b > 0
            s = np.where(pos, np.where(sqq > 0, sqx / sqq, 0.0), s)
            b = np.where(pos, 0.0, b)
        s = np.maximum(s, 0.0)
        # sum w (s q + b - x)^2, expanded in the moments.
        err = s * s * sqq + 2 * s * b * sq - 2 * s * sqx + b * b * sw - 2 * b * sx + sxx
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, -b, best_m)
    return best_s.astype(np.float32), best_m.astype(np.float32)


def quantize_sub_scales(v: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block super-scale (fp16) and integer sub-scales for ``v`` [B, S] >= 0."""
    qmax = (1 << nbits) - 1
    top = v.max(axis=1)  # [B]
    d = _f16(top / qmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[:, None] > 0, _round(v / d[:, None]), 0)
    return d, np.clip(q, 0, qmax).astype(np.uint8)


def codes_for(
    x: np.ndarray, scale: np.ndarray, offset: np.ndarray, nmax: int
) -> np.ndarray:
    """Codes 0..nmax for ``x ~ scale*q - offset`` given final (stored) scales."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale > 0, _round((x + offset) / scale), 0)
    return np.clip(q, 0, nmax).astype(np.uint8)


def fit_blocks(x: np.ndarray, w: np.ndarray, sub: int, nmax: int, scale_bits: int):
    """The K-quant recipe shared by Q2_K and Q4_K, on blocks ``x`` [B, 256]:
    fit each sub-block, quantize its scale and min against fp16 super-scales,
    then pick codes under the scales as stored.

    Returns d, dmin [B] (fp16 values), sub-scales, sub-mins [B, S] and codes
    [B, S, sub].
    """
    b, n_sub = x.shape[0], x.shape[1] // sub
    s, m = fit_min_scale(x.reshape(b * n_sub, sub), w.reshape(b * n_sub, sub), nmax)
    d, sc = quantize_sub_scales(s.reshape(b, n_sub), scale_bits)  # [B], [B, S]
    dmin, mq = quantize_sub_scales(m.reshape(b, n_sub), scale_bits)
    scale = (d[:, None] * sc.astype(np.float32))[..., None]  # [B, S, 1]
    offset = (dmin[:, None] * mq.astype(np.float32))[..., None]
    q = codes_for(x.reshape(b, n_sub, sub), scale, offset, nmax)
    return d, dmin, sc, mq, q


class Q2K(Codec, name="Q2_K"):
    """256 weights: 16 sub-blocks of 16, codes 0..3, 4-bit scale and min each."""

    sub = 16

    @classmethod
    def quantize_blocks(cls, x, w):
        b = x.shape[0]
        d, dmin, sc, mq, q = fit_blocks(x, w, 16, 3, 4)
        q = q.reshape(b, 2, 4, 32)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        out = np.empty((b, 84), dtype=np.uint8)
        out[:, :16] = sc | (mq << 4)
        out[:, 16:80] = qs.reshape(b, 64)
        out[:, 80:82] = d.astype(np.float16).view(np.uint8).reshape(b, 2)
        out[:, 82:84] = dmin.astype(np.float16).view(np.uint8).reshape(b, 2)
        return out

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
    def quantize_blocks(cls, x, w):
        b = x.shape[0]
        d, dmin, sc, mq, q = fit_blocks(x, w, 32, 15, 6)
        q = q.reshape(b, 4, 2, 32)
        out = np.empty((b, 144), dtype=np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(b, 2)
        out[:, 2:4] = dmin.astype(np.float16).view(np.uint8).reshape(b, 2)
        # get_scale_min_k4: 6-bit values, the high 2 bits of sub-blocks 4..7
        # ride in the top bits of bytes 0..7.
        out[:, 4:8] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
        out[:, 8:12] = (mq[:, :4] & 63) | ((mq[:, 4:] >> 4) << 6)
        out[:, 12:16] = (sc[:, 4:] & 0xF) | ((mq[:, 4:] & 0xF) << 4)
        out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(b, 128)
        return out

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
    def quantize_blocks(cls, x, w):
        b = x.shape[0]
        xs, ws = x.reshape(b * 16, 16), w.reshape(b * 16, 16)
        s = symmetric_scale(xs, ws, 32)  # x ~ s * q, q in -32..31
        top = np.abs(s.reshape(b, 16)).max(axis=1)
        d = _f16(top / 127)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(d[:, None] > 0, _round(s.reshape(b, 16) / d[:, None]), 0)
        sc = np.clip(sc, -128, 127).astype(np.int8)
        scale = (d[:, None] * sc.astype(np.float32))[..., None]  # [B, 16, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale != 0, _round(x.reshape(b, 16, 16) / scale), 0)
        u = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(b, 2, 4, 32)
        ql = np.empty((b, 2, 64), dtype=np.uint8)
        ql[:, :, :32] = (u[:, :, 0] & 0xF) | ((u[:, :, 2] & 0xF) << 4)
        ql[:, :, 32:] = (u[:, :, 1] & 0xF) | ((u[:, :, 3] & 0xF) << 4)
        qh = (
            (u[:, :, 0] >> 4)
            | ((u[:, :, 1] >> 4) << 2)
            | ((u[:, :, 2] >> 4) << 4)
            | ((u[:, :, 3] >> 4) << 6)
        )
        out = np.empty((b, 210), dtype=np.uint8)
        out[:, :128] = ql.reshape(b, 128)
        out[:, 128:192] = qh.reshape(b, 64)
        out[:, 192:208] = sc.view(np.uint8)
        out[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(b, 2)
        return out

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
    def quantize_blocks(cls, x, w):
        s = symmetric_scale(x, w, 127, steps=1)
        d = _f16(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[:, None] > 0, _round(x / d[:, None]), 0)
        out = np.empty((x.shape[0], 34), dtype=np.uint8)
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:] = np.clip(q, -127, 127).astype(np.int8).view(np.uint8)
        return out

    @classmethod
    def components_blocks(cls, raw):
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)  # [B, 1]
        q = raw[:, 2:].copy().view(np.int8).astype(np.int16) + 128
        return q.astype(np.uint8), d, None


def symmetric_scale(
    x: np.ndarray, w: np.ndarray, qmax: int, steps: int = 7
) -> np.ndarray:
    """Weighted best ``s`` for ``x ~ s*q``, q in -qmax..qmax-1 (or ..qmax)."""
    amax = np.abs(x).max(axis=1)
    best_s = amax / qmax
    if steps == 1:
        return best_s.astype(np.float32)
    best_err = np.full(x.shape[0], np.inf, dtype=np.float32)
    sxx = rowsum(w * x * x)
    for f in np.linspace(0.85, 1.0, steps, dtype=np.float32):
        with np.errstate(divide="ignore", invalid="ignore"):
            s0 = amax * f / qmax
            q = np.where(
                s0[:, None] > 0, np.clip(_round(x / s0[:, None]), -qmax, qmax - 1), 0
            )
            wq = w * q
            sqq = rowsum(wq * q)
            sqx = rowsum(wq * x)
            s = np.where(sqq > 0, sqx / sqq, 0.0)
        err = s * s * sqq - 2 * s * sqx + sxx
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
    return best_s.astype(np.float32)


def codec(name: str) -> type[Codec]:
    try:
        return Codec.registry[name]
    except KeyError:
        raise ConfigError(
            f"no codec for ggml type {name!r}; have {sorted(Codec.registry)}"
        ) from None
