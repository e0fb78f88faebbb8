"""ggml block layouts in numpy: Q2_K, Q4_K, Q6_K, Q8_0.

Quantizing: ggml's own C quantizers (edgemoe.quant.ggml_quant), or for
Q2_K and Q4_K a quick numpy fit of ggml's rounding with fewer candidate
scales (``quantize_quick``: the converter's planes; plane 1 weighted by
importance). Each layout is read back into its codes, scales and offsets
(ONNX export writes those) and dequantized with ggml's own float32
operation order, so a plane ggml computes with is reconstructed here
identically.

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

    QUICK_VALUES: ClassVar[int] = 1 << 16
    """Values per chunk of ``quantize_quick``: small enough that a fit's
    arrays stay in cache. The converter fits in one process per core
    (converters/fit_workers.py); `edgemoe convert` of bench_convert's model
    took 39.8 s at 1 << 16, 40.7 at 1 << 17 and 41.4 at 1 << 18 (one run
    each). In threads of one process larger chunks won, because there each
    numpy call that allocates its result costs several times more."""

    WEIGHTED_QUICK: ClassVar[bool] = False
    """Whether ``quick_blocks`` takes importance weights (a plane-1 fit)."""

    @classmethod
    def quantize_quick(
        cls,
        x: np.ndarray,
        importance: np.ndarray | None = None,
        residual: bool = False,
    ) -> np.ndarray:
        """Rows ``x`` [R, K] (finite float32) -> block bytes, by a small numpy
        fit (``quick_blocks``).

        Without ``importance``: ggml's reference rounding with 1-3 candidate
        scales per sub-block instead of 16-21, 2-4x faster at about its
        error; ggml's own where a codec has no ``quick_blocks``. With
        ``importance`` [K] (each column's mean squared input): an
        importance-weighted fit where the codec has one (``WEIGHTED_QUICK``);
        else ggml's weighted search for plane 1 and, for a ``residual``
        plane (noise-like, and too many to search), unweighted rounding."""
        if importance is not None and not cls.WEIGHTED_QUICK:
            if not residual:
                return cls.quantize(x, importance)
            importance = None
        if cls.quick_blocks.__func__ is Codec.quick_blocks.__func__:
            return cls.quantize(x, fit=False)
        bt = cls.btype
        r, k = x.shape
        if k % bt.block:
            raise ConfigError(
                f"{bt.name} needs rows of a multiple of {bt.block} values, "
                f"got shape {list(x.shape)}"
            )
        blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, bt.block)
        out = np.empty((len(blocks), bt.nbytes), dtype=np.uint8)
        per_row = k // bt.block  # chunks of whole rows: one importance tile
        step = max(cls.QUICK_VALUES // bt.block // per_row, 1) * per_row
        imp = None
        if importance is not None:  # [K] -> [blocks of a chunk, block]
            from edgemoe.quant.ggml_quant import importance as checked

            imp = checked(importance, k).reshape(per_row, bt.block)
            imp = np.tile(imp, (min(step, len(blocks)) // per_row, 1))
        for i in range(0, len(blocks), step):
            chunk = blocks[i : i + step]
            out[i : i + step] = cls.quick_blocks(
                chunk, None if imp is None else imp[: len(chunk)], residual
            )
        return out.reshape(r, -1)

    @classmethod
    def quick_blocks(
        cls, x: np.ndarray, imp: np.ndarray | None, residual: bool = False
    ) -> np.ndarray:
        """Blocks [B, block] float32 -> block bytes [B, nbytes]; ``imp``
        [B, block] each value's column importance, or None; ``residual``: a
        residual plane's fit (fewer candidates where the codec has a choice)."""
        raise NotImplementedError

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
        (scale = d * sub-scale first, then scale * code - offset): by ggml's
        own row dequantizer where the binding has it (10-20x faster, bit for
        bit the same), else in numpy (``dequantize_numpy``)."""
        from edgemoe.ggml_binding import row_to_float

        fn = row_to_float(cls.btype.ggml)
        if fn is None:
            return cls.dequantize_numpy(raw)
        bt = cls.btype
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        r = raw.shape[0]
        k = raw.size // r // bt.nbytes * bt.block if r else 0
        out = np.empty((r, k), dtype=np.float32)
        if out.size:
            fn(raw.ctypes.data, out.ctypes.data, out.size)
        return out

    @classmethod
    def dequantize_numpy(cls, raw: np.ndarray) -> np.ndarray:
        """``dequantize`` in numpy, ggml's float32 operation order."""
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

    WEIGHTED_QUICK = True
    PLANE1_STEPS = (-0.5, -0.3, -0.1, 0.1, 0.3, 0.5, 0.7, 0.9)
    """Candidate scales of plane 1's importance-weighted fit: 8 where ggml
    tries 37."""
    RESIDUAL_STEPS = (-1.0, 0.0, 1.0)
    """A residual plane's: as many as the unweighted fit, which the weights
    make about an eighth slower (bench_convert's per-plane table)."""

    @classmethod
    def quick_blocks(cls, x, imp, residual=False):
        b = x.shape[0]
        xt = np.ascontiguousarray(x.reshape(b, 16, 16).transpose(2, 0, 1))
        if imp is None:
            # ggml's reference weights (|x|), 3 candidate scales of its 16.
            fit = _fit_scale_min(xt, np.abs(xt), 3, cls.RESIDUAL_STEPS)
        else:
            # ggml's importance-weighted form, imp * sqrt(sigma2 + x^2), plus
            # its reference rounding's |x|, which keeps the large weights a
            # 2-bit grid must not lose. The fixture's KL divergence from
            # float against ggml's weighted search (paired, per token): over
            # its held-out text and two standard-library files (22k tokens),
            # with two calibration texts, level 2 13% and 10% lower, level 4
            # +0.8% and +0.1% (+-2.0%); over the held-out text alone, level 2
            # 6.3% lower (+-1.2%), level 4 +5.7% (+-4.4%). A third of its
            # time. ggml's weights alone with 8 scales: level 2 only 4% lower.
            sigma2 = np.einsum("bk,bk->b", x, x) / np.float32(256)  # [B]
            w = np.square(xt)
            w += sigma2[None, :, None]
            np.sqrt(w, out=w)
            w += np.abs(xt)
            w *= imp.reshape(b, 16, 16).transpose(2, 0, 1)
            steps = cls.RESIDUAL_STEPS if residual else cls.PLANE1_STEPS
            fit = _fit_scale_min(xt, w, 3, steps)
        sc, mn, d, dmin = _scales_and_mins(*fit, 4)
        q = _codes(xt, d * sc, dmin * mn, 3).reshape(b, 2, 4, 32)
        out = np.empty((b, cls.btype.nbytes), dtype=np.uint8)
        out[:, :16] = sc | (mn << 4)
        shifted = q << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
        out[:, 16:80] = np.bitwise_or.reduce(shifted, axis=2).reshape(b, 64)
        out[:, 80:82] = d.astype(np.float16).view(np.uint8)
        out[:, 82:84] = dmin.astype(np.float16).view(np.uint8)
        return out


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

    @classmethod
    def quick_blocks(cls, x, imp, residual=False):
        b = x.shape[0]
        xt = np.ascontiguousarray(x.reshape(b, 8, 32).transpose(2, 0, 1))
        # ggml's reference weights (rms + |x|), 1 candidate scale of its 21.
        rms = np.sqrt(np.einsum("nbs,nbs->bs", xt, xt) / np.float32(32))
        fit = _fit_scale_min(xt, rms + np.abs(xt), 15, (0.0,))
        sc, mn, d, dmin = _scales_and_mins(*fit, 6)
        q = _codes(xt, d * sc, dmin * mn, 15).reshape(b, 4, 2, 32)
        out = np.empty((b, cls.btype.nbytes), dtype=np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8)
        out[:, 2:4] = dmin.astype(np.float16).view(np.uint8)
        s = out[:, 4:16]  # 6-bit pairs: the low 4 whole, the high 4 split
        s[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
        s[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
        s[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
        out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(b, 128)
        return out


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


def _fit_scale_min(
    xt: np.ndarray, w: np.ndarray, nmax: int, steps: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-blocks ``xt`` [n, B, S] (value-major: numpy reduces a leading
    axis several times faster than a short trailing one) -> (scale, offset)
    [B, S] float32 with x ~ scale * l - offset, l in 0..nmax, offset >= 0
    (the range holds 0).

    ggml's ``make_qkx2_quants`` with fewer candidates: each inverse scale
    (nmax + step) / (max - min) rounds the codes, least squares weighted by
    ``w`` [n, B, S] refits scale and offset, the lowest weighted error wins.
    """
    lo = np.minimum(xt.min(axis=0), 0)  # [B, S]
    span = xt.max(axis=0) - lo
    wx = w * xt
    sw, sx = w.sum(axis=0), wx.sum(axis=0)
    sxx = np.einsum("nbs,nbs->bs", wx, xt)
    best_e = np.full(lo.shape, np.inf, dtype=np.float32)
    best_s = np.zeros(lo.shape, dtype=np.float32)
    best_m = lo.astype(np.float32)  # a flat sub-block: its value, scale 0
    shifted = xt - lo
    codes = np.empty_like(xt)
    wl = np.empty_like(xt)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in steps:
            inv = np.where(span > 0, np.float32(nmax + step) / span, 0)
            np.multiply(shifted, inv.astype(np.float32), out=codes)
            np.clip(np.rint(codes, out=codes), 0, nmax, out=codes)
            np.multiply(w, codes, out=wl)
            sl = wl.sum(axis=0)
            sll = np.einsum("nbs,nbs->bs", wl, codes)
            sxl = np.einsum("nbs,nbs->bs", wl, xt)
            det = sw * sll - sl * sl
            s = (sw * sxl - sx * sl) / det  # x ~ s * l + m
            m = (sll * sx - sl * sxl) / det
            # The range must hold 0, and one code (a flat positive
            # sub-block) fits only a scale: refit through 0 then.
            through0 = (m > 0) | ~(det > 0)
            s = np.where(through0, sxl / sll, s)
            m = np.where(through0, 0, m)
            e = s * (s * sll + 2 * m * sl - 2 * sxl) + m * (m * sw - 2 * sx) + sxx
            better = (s > 0) & (e < best_e)
            best_e = np.where(better, e, best_e)
            best_s = np.where(better, s, best_s)
            best_m = np.where(better, m, best_m)
    return best_s, -best_m


def _scales_and_mins(scale: np.ndarray, offset: np.ndarray, bits: int):
    """Sub-block scales and offsets [B, S] -> their ``bits``-bit codes [B, S]
    uint8 and the block's fp16 multipliers d, dmin [B, 1] (as float32)."""
    top = (1 << bits) - 1
    out = []
    for v in (scale, offset):
        vmax = v.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            code = np.where(vmax > 0, np.rint(v * (top / vmax)), 0)
        mult = (vmax / np.float32(top)).astype(np.float16).astype(np.float32)
        out.append((np.clip(code, 0, top).astype(np.uint8), mult))
    (sc, d), (mn, dmin) = out
    return sc, mn, d, dmin


def _codes(xt: np.ndarray, scale: np.ndarray, offset: np.ndarray, nmax: int):
    """Codes [B, S, n] uint8 of ``xt`` [n, B, S] for the stored scales and
    offsets [B, S]."""
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, 1 / scale, 0).astype(np.float32)
    q = (xt + offset.astype(np.float32)) * inv
    q = np.clip(np.rint(q, out=q), 0, nmax, out=q).astype(np.uint8)
    return q.transpose(1, 2, 0)


def codec(name: str) -> type[Codec]:
    try:
        return Codec.registry[name]
    except KeyError:
        raise ConfigError(
            f"no codec for ggml type {name!r}; have {sorted(Codec.registry)}"
        ) from None
