"""The attention block of a step graph: grouped-query attention (every
family but DeepSeek) and DeepSeek's latent attention (MLA), each writing its
cache rows in-graph before the one flash attention that reads them.
Legend: T tokens, D hidden, H query heads, Dh head size, L latent rank
(kv_lora_rank), R RoPE dims, C cache cells.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.runtime.device import T
from edgemoe.runtime.graph import Graph
from edgemoe.runtime.layers import LayerWeights
from edgemoe.runtime.step_ops import ROPE_NEOX, ROPE_NORMAL


@dataclass(frozen=True)
class StepInputs:
    """What attention reads beyond a layer's weights: the spec, the KV cache
    and the step's positions, cells, masks and RoPE constants."""

    spec: object
    cache: object
    pos: T
    cells: T
    mask: T
    mask_swa: T | None
    rope_ff: T | None
    rope_scale: float

    def rope(self, g: Graph, x: T, n_dims: int) -> T:
        """RoPE over ``n_dims`` of x [n_dims, heads, T] (YaRN where the
        model has it, via frequency factors and attention factor)."""
        s = self.spec
        mode = ROPE_NORMAL if s.rope_interleaved else ROPE_NEOX
        return g.rope(
            x, self.pos, n_dims, mode, s.rope_theta, attn_factor=self.rope_scale,
            freq_factors=self.rope_ff,
        )  # fmt: skip


def gqa(g: Graph, at: StepInputs, il: int, w: LayerWeights, xn: T) -> T:
    """Grouped-query attention of normed xn [D, T] -> [H * Dh, T]: q/k/v
    (biases, q/k norms, clipping), RoPE, this layer's window and sinks."""
    s = at.spec
    t, hd, eps = xn.ne[1], s.head_dim, s.rms_eps

    def proj(wt: T, b: T | None) -> T:
        y = g.mul_mat(wt, xn)
        return g.add(y, b) if b is not None else y

    q, k, v = proj(w.wq, w.bq), proj(w.wk, w.bk), proj(w.wv, w.bv)
    if s.qk_norm == "full":  # over the whole projection (OLMoE)
        q = g.mul(g.rms_norm(q, eps), w.q_norm)
        k = g.mul(g.rms_norm(k, eps), w.k_norm)
    if s.clip_qkv is not None:
        c = s.clip_qkv
        q, k, v = (g.clamp(y, -c, c) for y in (q, k, v))
    q = g.reshape(q, hd, s.n_head, t)  # [Dh, H, T]
    k = g.reshape(k, hd, s.n_head_kv, t)
    if s.qk_norm == "head":  # per head (Qwen3)
        q = g.mul(g.rms_norm(q, eps), w.q_norm)
        k = g.mul(g.rms_norm(k, eps), w.k_norm)
    q, k = at.rope(g, q, hd), at.rope(g, k, hd)
    kc, vc = (
        g.set_rows(cache[il], g.reshape(y, hd * s.n_head_kv, t), at.cells)
        for cache, y in ((at.cache.k, k), (at.cache.v, v))
    )
    mask = at.mask_swa if s.swa_layers and s.swa_layers[il] else at.mask
    scale = s.attn_scale or hd**-0.5
    out = g.attention(q, kc, vc, mask, mask.ne[0], s.n_head_kv, scale, w.sinks)
    return g.reshape(out, hd * s.n_head, t)


def latent(g: Graph, at: StepInputs, il: int, w: LayerWeights, xn: T) -> T:
    """DeepSeek's MLA on normed xn [D, T] -> [H * Dv, T]. The cache keeps
    each token's normed latent c [L] and RoPE key [R]; a head's query is
    moved into latent space (its nope part through the key expansion), so
    every head attends to the same cached rows, and its output leaves latent
    space through the value expansion (llama.cpp's absorbed MLA)."""
    s, m = at.spec, w.mla
    t, h, r, eps = xn.ne[1], s.n_head, s.head_dim, s.rms_eps
    nope, lora = s.qk_nope_dim, s.kv_lora_rank
    if m.wq is not None:
        q = g.mul_mat(m.wq, xn)
    else:
        qa = g.mul(g.rms_norm(g.mul_mat(m.wq_a, xn), eps), m.q_a_norm)
        q = g.mul_mat(m.wq_b, qa)  # [H * (nope + R), T]
    q = g.reshape(q, nope + r, h, t)
    row, plane = (nope + r) * 4, (nope + r) * h * 4
    q_nope = g.view_3d(q, nope, h, t, row, plane)  # [nope, H, T], strided
    q_pe = at.rope(g, g.cont(g.view_3d(q, r, h, t, row, plane, nope * 4)), r)
    kv = g.mul_mat(m.wkv_a, xn)  # [L + R, T]
    c = g.cont(g.view_2d(kv, lora, t, (lora + r) * 4, 0))
    c = g.mul(g.rms_norm(c, eps), m.kv_a_norm)  # [L, T]
    k_pe = g.cont(g.view_2d(kv, r, t, (lora + r) * 4, lora * 4))
    k_pe = at.rope(g, g.reshape(k_pe, r, 1, t), r)  # [R, 1, T]
    kc = g.set_rows(at.cache.k[il], g.concat(c, g.reshape(k_pe, r, t)), at.cells)
    # [L + R, C]: this step's rows written before they are read.
    q_lat = g.mul_mat(m.wk_b, g.permute(q_nope, 0, 2, 1, 3))  # [L, T, H]
    qf = g.concat(q_lat, g.cont(g.permute(q_pe, 0, 2, 1, 3)))  # [L + R, T, H]
    scale = s.attn_scale or (nope + r) ** -0.5
    out = g.attention_latent(qf, kc, at.mask, at.mask.ne[0], lora, scale)  # [L, H, T]
    o = g.mul_mat(m.wv_b, g.permute(out, 0, 2, 1, 3))  # [Dv, T, H]
    return g.reshape(g.cont(g.permute(o, 0, 2, 1, 3)), s.v_head_dim * h, t)
