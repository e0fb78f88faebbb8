"""MXFP4, as gpt-oss's checkpoints store their experts and as ggml runs it.

A block is 32 weights: an E8M0 scale byte (2^(e - 127)) and 32 FP4 (E2M1)
codes. The HF checkpoint keeps the two apart (``*_blocks`` [..., G, 16] of
code pairs, ``*_scales`` [..., G]) with weight 2j in byte j's low nibble and
2j + 1 in its high one; ggml's ``block_mxfp4`` is the scale byte then 16
bytes with weight j low and j + 16 high. The codes and scale bytes are the
same numbers either way, so a checkpoint runs in ggml exactly.
Legend: G blocks per row.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
BLOCK_BYTES = 17
_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_VALUES = np.array(_MAGNITUDES + [-m for m in _MAGNITUDES], np.float32)
"""Code -> value; bit 3 is the sign."""


def ggml_from_hf(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF ``blocks`` uint8 [..., G, 16] and ``scales`` uint8 [..., G] ->
    ggml's MXFP4 rows, uint8 [..., G * 17]."""
    codes = np.empty((*blocks.shape[:-1], BLOCK), np.uint8)  # [..., G, 32]
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    out = np.empty((*blocks.shape[:-1], BLOCK_BYTES), np.uint8)  # [..., G, 17]
    out[..., 0] = scales
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(*blocks.shape[:-2], -1)


def quantize_hf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., K] (K a multiple of 32) -> HF (blocks [..., G, 16],
    scales [..., G]): each block scaled so its largest magnitude fits 6, each
    weight rounded to the nearest code. For tests and synthetic models; real
    checkpoints come quantized."""
    # C order throughout: a transposed input would leave the outputs strided.
    g = np.ascontiguousarray(x, np.float32).reshape(*x.shape[:-1], -1, BLOCK)
    amax = np.abs(g).max(-1)
    e = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0)
    e = np.clip(e, -127, 127)
    scaled = g / np.exp2(e)[..., None]
    nearest = np.abs(np.abs(scaled)[..., None] - FP4_VALUES[:8]).argmin(-1)
    codes = nearest.astype(np.uint8)
    codes |= np.where(scaled < 0, 8, 0).astype(np.uint8)  # the sign bit
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(
        e + 127, np.uint8
    )


def dequantize_hf(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF blocks and scales -> float32 [..., G * 32] (transformers' own
    ``convert_moe_packed_tensors`` without its final transpose)."""
    codes = np.empty((*blocks.shape[:-1], BLOCK), np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    vals = FP4_VALUES[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)
