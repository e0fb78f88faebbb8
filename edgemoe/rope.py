"""RoPE frequencies of a model: plain, or scaled by YaRN as transformers
computes them (``_compute_yarn_parameters``), so that the runtime's ggml
RoPE and the numpy reference rotate by the same angles.

ggml's ``rope_ext`` would apply YaRN itself, but always rounds the correction
range to whole dimensions; gpt-oss's config asks for it unrounded. So the
runtime passes ggml plain RoPE with per-pair ``freq_factors`` (the plain
frequency over YaRN's) and YaRN's attention factor as ``attn_factor``: any
frequencies, exactly.
"""

from __future__ import annotations

import math

import numpy as np

from edgemoe.arch.base import ModelSpec


def plain_inv_freq(spec: ModelSpec) -> np.ndarray:
    """[head_dim / 2] float64: theta^(-2i / head_dim)."""
    hd = spec.head_dim
    return 1.0 / (spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))


def inv_freq(spec: ModelSpec) -> np.ndarray:
    """[head_dim / 2] float64: the angle per position of each rotated pair."""
    plain = plain_inv_freq(spec)
    if spec.rope_scaling != "yarn":
        return plain
    hd, base = spec.head_dim, spec.rope_theta

    def correction_dim(rotations: float) -> float:
        return (hd * math.log(spec.rope_orig_ctx / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(spec.rope_beta_fast), correction_dim(spec.rope_beta_slow)
    if spec.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # [hd / 2]: 1 keeps the trained frequency
    return plain / spec.rope_factor * (1 - extrapolate) + plain * extrapolate


def attn_factor(spec: ModelSpec) -> float:
    """The scale of cos and sin (YaRN's "mscale"); 1 without scaling."""
    if spec.rope_scaling != "yarn":
        return 1.0
    if spec.rope_attn_factor is not None:
        return spec.rope_attn_factor
    f = spec.rope_factor
    return 0.1 * math.log(f) + 1.0 if f > 1 else 1.0


def freq_factors(spec: ModelSpec) -> np.ndarray | None:
    """ggml's ``freq_factors`` [head_dim / 2] float32 for these frequencies
    (None for plain RoPE)."""
    if spec.rope_scaling is None:
        return None
    return (plain_inv_freq(spec) / inv_freq(spec)).astype(np.float32)
