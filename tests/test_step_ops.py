"""The whole-step graph's ggml ops against numpy, and the checks that stand
between a bad shape or id and a ggml assertion (which would abort)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.arch.base import ModelSpec
from edgemoe.attention import RoPE
from edgemoe.checkpoint.base import Weight, aligned_empty
from edgemoe.errors import GGMLError
from edgemoe.runtime.device import Device, WeightSet
from edgemoe.runtime.graph import Graph
from edgemoe.runtime.step_ops import NEG_BIG, ROPE_NEOX, ROPE_NORMAL

RNG = np.random.default_rng(0)
F, I32 = np.float32, np.int32


def A(x) -> np.ndarray:
    """An aligned copy: ggml binds host arrays in place, 32-byte aligned."""
    x = np.asarray(x)
    out = aligned_empty(x.shape, x.dtype)
    out[...] = x
    return out


class G(Graph):
    """A Graph whose test inputs are copied to aligned memory first."""

    def inp(self, x):
        return self.input(A(x))

    def rows(self, x, n):
        return self.ids(A(np.asarray(x, I32)), n)


@pytest.fixture(scope="module")
def device():
    return Device("cpu", 1)


def run(device, build, shape, dtype=F):
    """``build(g)`` returns the result tensor; computed once into a new array."""
    g = G(device, n_tensors=64)
    try:
        out = aligned_empty(shape, dtype)
        g.output(build(g), out)
        g.build()
        g.compute()
        return out
    finally:
        g.free()


def test_get_rows_of_float_and_quantized_tables(device):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    table = RNG.standard_normal((50, 64)).astype(F)
    ids = [3, 0, 49, 3]
    out = run(device, lambda g: g.get_rows(g.inp(table), g.rows(ids, 50)), (4, 64))
    np.testing.assert_array_equal(out, table[ids])

    q = A(quantize(table, GGMLQuantizationType.Q8_0))
    ws = WeightSet(device, capacity=2)
    w = ws.add(Weight("t", 8, (50, 64), q))
    ws.finalize()
    out = run(device, lambda g: g.get_rows(w, g.rows(ids, 50)), (4, 64))
    ref = dequantize(q, GGMLQuantizationType.Q8_0)[ids]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_row_ids_are_range_checked_before_ggml_sees_them(device):
    table = np.zeros((10, 8), F)
    ids = A(np.array([9], I32))
    g = G(device, n_tensors=16)
    try:
        g.output(g.get_rows(g.inp(table), g.ids(ids, 10)), aligned_empty((1, 8), F))
        g.build()
        ids[0] = 10  # past the table: ggml would assert
        with pytest.raises(GGMLError, match="out of range"):
            g.compute()
        with pytest.raises(GGMLError, match=r"Graph\.ids"):
            g.get_rows(g.inp(table), g.inp(np.zeros(1, I32)))
        with pytest.raises(GGMLError, match="bound of at most 10"):
            g.get_rows(g.inp(table), g.rows([0], 11))
    finally:
        g.free()


def test_set_rows_writes_cache_rows_in_place(device):
    cache = A(np.zeros((16, 32), F))  # [positions, head_dim x heads]
    src = RNG.standard_normal((3, 32)).astype(F)
    g = G(device, n_tensors=16)
    try:
        g.expand(g.set_rows(g.input(cache), g.inp(src), g.rows([5, 6, 7], 16)))
        g.output(g.scale(g.inp(np.ones(1, F)), 2.0), aligned_empty((1,), F))
        g.build()
        g.compute()
    finally:
        g.free()
    np.testing.assert_array_equal(cache[5:8], src)
    assert not cache[:5].any() and not cache[8:].any()


def rope_spec(hd: int, theta: float, interleaved: bool, **yarn) -> ModelSpec:
    return ModelSpec(
        family="test", n_vocab=8, n_embd=hd, n_layer=1, n_head=1, n_head_kv=1,
        head_dim=hd, n_ctx_train=4096, rms_eps=1e-5, rope_theta=theta,
        rope_interleaved=interleaved, dense_ffn=8, moe_layers=(False,), **yarn,
    )  # fmt: skip


YARN = [
    {},
    dict(
        rope_scaling="yarn", rope_factor=32.0, rope_orig_ctx=4096, rope_truncate=False
    ),
    dict(rope_scaling="yarn", rope_factor=4.0, rope_orig_ctx=256),
]


@pytest.mark.parametrize("yarn", YARN, ids=["plain", "yarn-exact", "yarn-truncated"])
@pytest.mark.parametrize("interleaved, mode", [(True, ROPE_NORMAL), (False, ROPE_NEOX)])
def test_rope_matches_the_numpy_tables(device, interleaved, mode, yarn):
    """ggml's RoPE with the per-pair frequency factors and attention factor
    of ``edgemoe.rope`` against the numpy tables; positions past the
    original context of the truncated case (ggml turns angles in float32,
    so far larger positions differ by more than the tolerance)."""
    from edgemoe import rope

    t, heads, hd, theta, start = 5, 4, 64, 150000.0, 300
    spec = rope_spec(hd, theta, interleaved, **yarn)
    x = RNG.standard_normal((t, heads, hd)).astype(F)  # [T, H, Dh]
    pos = np.arange(start, start + t, dtype=I32)
    ff = rope.freq_factors(spec)

    def build(g):
        f = g.inp(ff) if ff is not None else None
        return g.rope(
            g.inp(x), g.inp(pos), hd, mode, theta, attn_factor=rope.attn_factor(spec),
            freq_factors=f,
        )  # fmt: skip

    out = run(device, build, x.shape)
    ref = RoPE(spec, start + t).apply(x, start)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_yarn_frequencies_are_transformers_own():
    """``edgemoe.rope`` against transformers' YaRN (truncated or not) and its
    attention factor."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgemoe import rope

    for truncate in (True, False):
        cfg = transformers.GptOssConfig(
            head_dim=64, num_attention_heads=4, hidden_size=256,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                beta_slow=1.0, truncate=truncate, original_max_position_embeddings=4096,
            ),
        )  # fmt: skip
        inv, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        spec = rope_spec(
            64, 150000.0, False, rope_scaling="yarn", rope_factor=32.0,
            rope_orig_ctx=4096, rope_truncate=truncate,
        )  # fmt: skip
        np.testing.assert_allclose(rope.inv_freq(spec), inv.numpy(), rtol=1e-6)
        assert rope.attn_factor(spec) == pytest.approx(scale)


@pytest.mark.parametrize("kind", ["softmax_topk", "sigmoid_topk"])
def test_grouped_routing_matches_the_numpy_router(device, kind):
    """DeepSeek's routing in the graph (scores, the correction bias moving
    the choice, the best of 4 groups, renormalised and scaled weights)
    against ``edgemoe.routing.scored_topk``."""
    from edgemoe.routing import scored_topk

    t, e, k, g, tg = 7, 16, 3, 4, 1
    logits = RNG.standard_normal((t, e)).astype(F)  # [T, E]
    # V3's correction bias (V2's softmax routing has none).
    select = (
        (RNG.standard_normal(e) * 0.3).astype(F) if kind == "sigmoid_topk" else None
    )
    eye, big = A(np.eye(g, dtype=F)), A(np.full(1, NEG_BIG, F))
    ids_out, w_out = aligned_empty((t, k), I32), aligned_empty((t, k, 1), F)
    gr = G(device, n_tensors=96)
    try:
        ids, w = gr.route(
            gr.inp(logits), k, kind, True,
            None if select is None else gr.inp(select), 2.5,
            (tg, gr.input(eye), gr.input(big)),
        )  # fmt: skip
        gr.output(gr.cont(ids), ids_out)
        gr.output(gr.cont(w), w_out)
        gr.build()
        gr.compute()
    finally:
        gr.free()
    ref_ids, ref_w = scored_topk(
        logits.astype(np.float64), k, kind, True, select, (g, tg), 2.5
    )
    np.testing.assert_array_equal(ids_out, ref_ids)
    np.testing.assert_allclose(w_out[..., 0], ref_w, rtol=1e-5)
    # The groups bite: without them some token picks other experts.
    free, _ = scored_topk(logits.astype(np.float64), k, kind, True, select)
    assert (np.sort(free, 1) != np.sort(ref_ids, 1)).any()


def test_top_k_softmax_routing_and_expert_biases(device):
    """gpt-oss's routing (softmax over the top-k logits) and add_id (each
    expert's bias row on its own rows) against numpy."""
    t, e, k, n = 5, 8, 3, 16
    logits = RNG.standard_normal((t, e)).astype(F)  # [T, E]
    bias = RNG.standard_normal((e, n)).astype(F)  # [E, N]
    y = RNG.standard_normal((t, k, n)).astype(F)  # [T, K, N]
    ids_out, w_out, z_out = (
        aligned_empty((t, k), I32), aligned_empty((t, k, 1), F),
        aligned_empty((t, k, n), F),
    )  # fmt: skip
    g = G(device, n_tensors=32)
    try:
        ids, w = g.route(g.inp(logits), k, "topk_softmax", False)
        g.output(g.cont(ids), ids_out)
        g.output(g.cont(w), w_out)
        g.output(g.add_id(g.inp(y), g.inp(bias), ids), z_out)
        g.build()
        g.compute()
    finally:
        g.free()
    ref_ids = np.argsort(-logits, axis=1)[:, :k]
    top = np.take_along_axis(logits, ref_ids, 1)
    ref_w = np.exp(top - top.max(1, keepdims=True))
    np.testing.assert_array_equal(ids_out, ref_ids)
    np.testing.assert_allclose(
        w_out[..., 0], ref_w / ref_w.sum(1, keepdims=True), rtol=1e-5
    )
    np.testing.assert_allclose(z_out, y + bias[ref_ids], rtol=1e-6)


def test_soft_max(device):
    a = RNG.standard_normal((2, 3, 8)).astype(F)
    out = run(device, lambda g: g.soft_max(g.inp(a)), a.shape)
    ref = np.exp(a - a.max(-1, keepdims=True))
    np.testing.assert_allclose(out, ref / ref.sum(-1, keepdims=True), rtol=1e-5)


def test_top_k_is_routing_order(device):
    logits = RNG.standard_normal((6, 16)).astype(F)  # [T, E]
    out = run(device, lambda g: g.cont(g.top_k(g.inp(logits), 4)), (6, 4), I32)
    np.testing.assert_array_equal(out, np.argsort(-logits, axis=1)[:, :4])


def test_permute_then_cont(device):
    x = RNG.standard_normal((3, 4, 5)).astype(F)  # ne (5, 4, 3)
    # ggml's permute(0, 2, 1, 3) swaps ne1 and ne2: numpy axes 1 and 0.
    out = run(device, lambda g: g.cont(g.permute(g.inp(x), 0, 2, 1, 3)), (4, 3, 5))
    np.testing.assert_array_equal(out, x.transpose(1, 0, 2))


def _x(g):
    return g.inp(np.zeros((2, 2, 8), F))  # [T=2, H=2, Dh=8]


def _m(g, rows, cols):
    return g.inp(np.zeros((rows, cols), F))


def _attend(g, cache, n_kv):
    return g.attention(_x(g), cache, cache, None, n_kv, 2, 1.0)  # Dh 8, H 2


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda g: g.rope(_x(g), g.inp(np.zeros(3, I32)), 8, 2, 1e4), "positions"),
        (lambda g: g.rope(_x(g), g.inp(np.zeros(2, I32)), 9, 2, 1e4), "n_dims 9"),
        (lambda g: g.rope(_x(g), g.inp(np.zeros(2, I32)), 8, 1, 1e4), "mode 1"),
        (lambda g: g.top_k(g.inp(np.zeros((2, 8), F)), 9), "k 9"),
        (lambda g: g.permute(g.inp(np.zeros((2, 8), F)), 0, 0, 1, 2), "permutation"),
        (
            lambda g: g.output(
                g.top_k(g.inp(np.zeros((2, 8), F)), 2), aligned_empty((2, 2), I32)
            ),
            "view",
        ),
        (lambda g: g.view_3d(_m(g, 4, 8), 8, 2, 3, 32, 64), "outside"),
        (lambda g: _attend(g, _m(g, 4, 8), 2), "kv heads"),
        (lambda g: _attend(g, _m(g, 4, 16), 5), "5 positions"),
        (lambda g: _attend(g, _m(g, 4, 16), 4), "contiguous F16"),
        (
            lambda g: g.attention(
                _x(g), _m(g, 4, 16), _m(g, 4, 16), g.inp(np.zeros((2, 4), np.float16)),
                4, 2, 1.0, g.inp(np.zeros(3, F)),
            ),
            "sinks must be float32",
        ),  # fmt: skip
        (
            lambda g: g.rope(
                _x(g), g.inp(np.zeros(2, I32)), 8, 2, 1e4,
                freq_factors=g.inp(np.ones(8, F)),
            ),
            "freq_factors must be float32",
        ),  # fmt: skip
        (
            lambda g: g.add_id(
                g.inp(np.zeros((2, 2, 8), F)), _m(g, 4, 8), g.inp(np.zeros((2, 2), I32))
            ),
            "Graph.ids",
        ),
        (
            lambda g: g.add_id(
                g.inp(np.zeros((2, 2, 8), F)), _m(g, 4, 8),
                g.ids(A(np.zeros((2, 2), I32)), 5),
            ),
            "bound of at most 4",
        ),  # fmt: skip
    ],
    ids=[
        "rope-pos", "rope-dims", "rope-mode", "top-k",
        "permute", "strided-out", "view-3d", "attn-heads", "attn-kv", "attn-mask",
        "attn-sinks", "rope-freq-factors", "add-id-unchecked", "add-id-bound",
    ],
)  # fmt: skip
def test_shapes_ggml_would_assert_on_are_refused(device, build, needle):
    g = G(device, n_tensors=16)
    try:
        with pytest.raises(GGMLError, match=needle):
            build(g)
    finally:
        g.free()


@pytest.mark.parametrize(
    "p0, t, n_kv", [(0, 5, 10), (9, 1, 20), (6, 3, 64), (40, 1, 576), (40, 6, 576)]
)
def test_attention_over_a_cache_written_in_the_same_graph(device, p0, t, n_kv):
    """This step's keys and values (a cell per row) go into the caches with
    set_rows, then GQA attention reads cells 0..p0+t-1 with every other cell
    hidden (another sequence's, as in a batch, and the padding up to n_kv):
    against numpy, prefill and decode, over fewer and more cells than ggml's
    split of decode attention across threads (from 512 cells on)."""
    hd, heads, kvh, n_ctx = 16, 4, 2, 576
    dkv, scale = kvh * hd, hd**-0.5
    k_cache = A(RNG.standard_normal((n_ctx, dkv)).astype(F))  # old rows
    v_cache = A(RNG.standard_normal((n_ctx, dkv)).astype(F))
    q = RNG.standard_normal((t, heads, hd)).astype(F)
    k_new = RNG.standard_normal((t, dkv)).astype(F)
    v_new = RNG.standard_normal((t, dkv)).astype(F)
    cells = np.arange(p0, p0 + t) * 2  # this sequence owns the even cells
    mask = A(np.full((t, n_kv), -np.inf, np.float16))
    for i in range(t):
        mask[i, : 2 * (p0 + i) + 1 : 2] = 0
    ref_k, ref_v = k_cache.copy(), v_cache.copy()
    ref_k[cells], ref_v[cells] = k_new, v_new

    def build(g):
        kc = g.set_rows(g.input(k_cache), g.inp(k_new), g.rows(cells, n_ctx))
        vc = g.set_rows(g.input(v_cache), g.inp(v_new), g.rows(cells, n_ctx))
        return g.attention(g.inp(q), kc, vc, g.input(mask), n_kv, kvh, scale)

    out = run(device, build, (t, heads, hd))
    kk = ref_k[:n_kv].reshape(n_kv, kvh, hd)
    vv = ref_v[:n_kv].reshape(n_kv, kvh, hd)
    ref = np.empty((t, heads, hd), F)
    for h in range(heads):
        kv = h // (heads // kvh)
        s = q[:, h] @ kk[:, kv].T * scale + mask.astype(F)  # [T, n_kv]
        w = np.exp(s - s.max(-1, keepdims=True))
        ref[:, h] = (w / w.sum(-1, keepdims=True)) @ vv[:, kv]
    np.testing.assert_allclose(out.reshape(t, heads, hd), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(k_cache, ref_k)  # written in place
    np.testing.assert_array_equal(v_cache, ref_v)


@pytest.mark.parametrize("normalize", [True, False])
def test_in_graph_routing_matches_the_numpy_router(device, normalize):
    """softmax -> top-k -> weights (renormalised or not) as routing.softmax_topk
    computes them, and top_k's ids drive mul_mat_id directly."""
    from edgemoe.routing import softmax_topk

    t, e, k, d, n = 6, 8, 2, 32, 16
    logits = RNG.standard_normal((t, e)).astype(F)  # [T, E]
    experts = A(RNG.standard_normal((e, n, d)).astype(F))  # [E, N, D]
    x = RNG.standard_normal((t, 1, d)).astype(F)
    ids_out, w_out, y_out = (
        aligned_empty((t, k), I32), aligned_empty((t, k, 1), F),
        aligned_empty((t, k, n), F),
    )  # fmt: skip
    ws = WeightSet(device, capacity=2)
    we = ws.add(Weight("e", 0, experts.shape, experts))
    ws.finalize()
    g = G(device, n_tensors=64)
    try:
        ids, w = g.route(g.inp(logits), k, "softmax_topk", normalize)
        g.output(g.cont(ids), ids_out)
        g.output(g.cont(w), w_out)
        g.output(g.mul_mat_id(we, g.inp(x), ids), y_out)
        g.build()
        g.compute()
    finally:
        g.free()
    ref_ids, ref_w = softmax_topk(logits.astype(np.float64), k, normalize)
    order = np.argsort(-np.take_along_axis(logits, ref_ids, 1), axis=1)
    ref_ids = np.take_along_axis(ref_ids, order, 1)  # largest first, as top_k
    ref_w = np.take_along_axis(ref_w, order, 1)
    np.testing.assert_array_equal(ids_out, ref_ids)
    np.testing.assert_allclose(w_out[..., 0], ref_w, rtol=1e-5, atol=1e-6)
    ref_y = np.einsum("tknd,td->tkn", experts[ref_ids], x[:, 0])
    np.testing.assert_allclose(y_out, ref_y, rtol=1e-4, atol=1e-4)
