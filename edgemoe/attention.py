"""Grouped-query attention with RoPE and a KV cache, in numpy.

The converter's calibration pass runs its float forward with this, and tests
use it as a reference; the runtime computes attention inside its step graphs
(runtime/step.py).
Legend: T new tokens, S cached + new positions, H query heads, Hkv kv heads,
G = H / Hkv, Dh head dim; for MLA, L the latent (kv_lora_rank), N the
no-RoPE part of a query/key head, R its RoPE part, V a value head.
"""

from __future__ import annotations

import numpy as np

from edgemoe.arch.base import ModelSpec


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, computed in float32 like the references."""
    # einsum avoids np.mean's temporaries and Python-level overhead per call.
    ms = np.einsum("...i,...i->...", x, x)[..., None] / np.float32(x.shape[-1])
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * weight


class RoPE:
    """Rotary embedding tables for positions ``0..n_ctx-1``."""

    def __init__(self, spec: ModelSpec, n_ctx: int):
        from edgemoe import rope

        inv = rope.inv_freq(spec)  # [Dh/2], YaRN-scaled where the model is
        ang = np.arange(n_ctx, dtype=np.float64)[:, None] * inv[None, :]  # [C, Dh/2]
        scale = rope.attn_factor(spec)
        self.cos = (np.cos(ang) * scale).astype(np.float32)
        self.sin = (np.sin(ang) * scale).astype(np.float32)
        self.interleaved = spec.rope_interleaved
        self.half = spec.head_dim // 2

    def apply(self, x: np.ndarray, pos: int) -> np.ndarray:
        """Rotate ``x`` [T, heads, Dh] whose first token sits at ``pos``."""
        t = x.shape[0]
        cos = self.cos[pos : pos + t, None, :]  # [T, 1, Dh/2]
        sin = self.sin[pos : pos + t, None, :]
        if self.interleaved:
            # llama.cpp "normal" RoPE: rotate pairs (2i, 2i+1).
            a, b = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = a * cos - b * sin
            out[..., 1::2] = b * cos + a * sin
            return out
        a, b = x[..., : self.half], x[..., self.half :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class KVCache:
    """Keys and values of every layer, ``[L, Hkv, n_ctx, Dh]`` float32.

    ``np.zeros`` maps untouched pages lazily, so memory grows with the
    positions actually used, not with ``n_ctx``.
    """

    def __init__(self, spec: ModelSpec, n_ctx: int):
        shape = (spec.n_layer, spec.n_head_kv, n_ctx, spec.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.n_ctx = n_ctx

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Attention:
    """The numpy half of one attention block (after q/k/v, before the output
    projection): q/k norms, clipping, RoPE, cache update, softmax(QK^T)V."""

    def __init__(self, spec: ModelSpec, rope: RoPE, cache: KVCache):
        self.spec = spec
        self.rope = rope
        self.cache = cache
        self.scale = 1.0 / np.sqrt(spec.head_dim)

    def __call__(
        self,
        layer: int,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        pos: int,
        out: np.ndarray,
        q_norm: np.ndarray | None = None,
        k_norm: np.ndarray | None = None,
        window: int | None | bool = True,
        sinks: np.ndarray | None = None,
    ) -> None:
        """Write attention output [T, H*Dh] into ``out`` for tokens at ``pos``;
        ``window``: the layer's sliding window (True: the spec's), ``sinks``
        [H]: a logit per head that joins each softmax with no value."""
        s = self.spec
        if window is True:
            window = s.sliding_window
        t, hd, hkv = q.shape[0], s.head_dim, s.n_head_kv
        g = s.n_head // hkv
        if s.qk_norm == "full":
            q = rms_norm(q, q_norm, s.rms_eps)
            k = rms_norm(k, k_norm, s.rms_eps)
        if s.clip_qkv is not None:
            c = s.clip_qkv
            q, k, v = np.clip(q, -c, c), np.clip(k, -c, c), np.clip(v, -c, c)
        q = q.reshape(t, s.n_head, hd)  # [T, H, Dh]
        k = k.reshape(t, hkv, hd)  # [T, Hkv, Dh]
        if s.qk_norm == "head":
            q = rms_norm(q, q_norm, s.rms_eps)
            k = rms_norm(k, k_norm, s.rms_eps)
        q = self.rope.apply(q, pos)
        k = self.rope.apply(k, pos)
        end = pos + t
        self.cache.k[layer, :, pos:end] = k.transpose(1, 0, 2)
        self.cache.v[layer, :, pos:end] = v.reshape(t, hkv, hd).transpose(1, 0, 2)
        start = 0
        if window:
            start = max(0, end - t - window + 1)
        keys = self.cache.k[layer, :, start:end]  # [Hkv, S, Dh]
        vals = self.cache.v[layer, :, start:end]
        qh = q.transpose(1, 0, 2).reshape(hkv, g * t, hd) * np.float32(self.scale)
        scores = np.matmul(qh, keys.transpose(0, 2, 1))  # [Hkv, G*T, S]
        scores = scores.reshape(hkv, g, t, -1)  # [Hkv, G, T, S]
        if t > 1 or window:
            qpos = np.arange(pos, end)[:, None]  # [T, 1]
            kpos = np.arange(start, end)[None, :]  # [1, S]
            masked = kpos > qpos
            if window:
                masked |= kpos <= qpos - window
            scores[..., masked] = -np.inf
        top = scores.max(axis=-1, keepdims=True)
        if sinks is not None:  # [H] as [Hkv, G, 1, 1]
            top = np.maximum(top, sinks.reshape(hkv, g, 1, 1))
        scores -= top
        np.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        if sinks is not None:
            total += np.exp(sinks.reshape(hkv, g, 1, 1) - top)
        scores /= total
        ctx = np.matmul(scores.reshape(hkv, g * t, -1), vals)  # [Hkv, G*T, Dh]
        out[...] = ctx.reshape(s.n_head, t, hd).transpose(1, 0, 2).reshape(t, -1)


def latent_attention(
    spec: ModelSpec, rope: RoPE, w: dict[str, np.ndarray], xn: np.ndarray
) -> np.ndarray:
    """DeepSeek's MLA over one causal window ``xn`` [T, D] from position 0, in
    the expanded form transformers computes (keys and values per head; the
    runtime's graph computes the absorbed form). ``w``: the layer's weights
    by llama.cpp name (``attn_q`` or ``attn_q_a``/``_norm``/``attn_q_b``,
    ``attn_kv_a_mqa``, ``attn_kv_a_norm``, ``attn_k_b``, ``attn_v_b``).
    Returns [T, H*V], before the output projection."""
    s = spec
    t, h, nope, lora = xn.shape[0], s.n_head, s.qk_nope_dim, s.kv_lora_rank
    if s.q_lora_rank:
        qa = rms_norm(xn @ w["attn_q_a"].T, w["attn_q_a_norm"], s.rms_eps)
        q = qa @ w["attn_q_b"].T
    else:
        q = xn @ w["attn_q"].T
    q = q.reshape(t, h, -1).transpose(1, 0, 2)  # [H, T, N + R]
    kv = xn @ w["attn_kv_a_mqa"].T  # [T, L + R]
    latent = rms_norm(kv[:, :lora], w["attn_kv_a_norm"], s.rms_eps)  # [T, L]
    k_pe = rope.apply(kv[:, None, lora:], 0)[:, 0]  # [T, R]
    q_pe = rope.apply(q[..., nope:].transpose(1, 0, 2), 0).transpose(1, 0, 2)
    k_nope = np.matmul(latent[None], w["attn_k_b"])  # [H, T, N]
    v = np.matmul(latent[None], w["attn_v_b"].transpose(0, 2, 1))  # [H, T, V]
    scores = np.matmul(q[..., :nope], k_nope.transpose(0, 2, 1))  # [H, T, T]
    scores += np.matmul(q_pe, k_pe.T)
    scores *= np.float32(s.attn_scale or (nope + s.head_dim) ** -0.5)
    scores[:, np.triu(np.ones((t, t), dtype=bool), 1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.matmul(scores, v).transpose(1, 0, 2).reshape(t, -1)  # [T, H*V]
