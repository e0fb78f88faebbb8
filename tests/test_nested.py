"""Nested quantization: codec layouts, level round trips, ggml sum-of-planes."""

from __future__ import annotations

import numpy as np
import pytest
from refs import q8

from edgemoe.checkpoint.base import Weight, aligned_empty
from edgemoe.errors import ConfigError
from edgemoe.quant.kquants import codec
from edgemoe.quant.nested import plane_shifts, quantize_nested, reconstruct
from edgemoe.quant.types import BLOCK_TYPES, NestedQuant

CODECS = ["Q2_K", "Q4_K", "Q6_K", "Q8_0"]
PLANS = [(2, 4, 8), (4, 8), (2, 4, 6, 8), (8,), (2, 8)]
# Relative RMS error of each codec on Gaussian weights: a regression bound.
MAX_REL_RMSE = {"Q2_K": 0.29, "Q4_K": 0.075, "Q6_K": 0.022, "Q8_0": 0.006}


def weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.02).astype(
        np.float32
    )


@pytest.mark.parametrize("name", CODECS, ids=CODECS)
def test_codec_bytes_are_ggml_layout(name):
    """gguf-py's dequantizer (a reference for ggml's layouts) reads our bytes
    exactly as we do, and the fit stays within its error bound."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = weights(32, 512)
    raw = codec(name).quantize(x)
    bt = BLOCK_TYPES[name]
    assert raw.shape == (32, bt.row_bytes(512))
    ours = codec(name).dequantize(raw)
    ref = dequantize(raw, GGMLQuantizationType[name]).reshape(ours.shape)
    assert np.array_equal(ours, ref)
    rel = np.sqrt(np.mean((ours - x) ** 2) / np.mean(x**2))
    assert rel < MAX_REL_RMSE[name]


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K"], ids=["Q2_K", "Q4_K"])
def test_importance_weights_steer_the_fit(name):
    """Columns weighted 100x come out more accurate than unweighted ones."""
    x = weights(64, 256, seed=1)
    w = np.ones(256, dtype=np.float32)
    w[::2] = 100.0
    deq = codec(name).dequantize(codec(name).quantize(x, w))
    err = (deq - x) ** 2
    assert err[:, ::2].mean() < 0.8 * err[:, 1::2].mean()


def test_weighted_quick_fit_steers_by_importance():
    """Plane 1's numpy fit: columns weighted 100x come out more accurate;
    in importance-weighted error it stays near ggml's weighted search
    (measured 1.13x) and well below ggml's unweighted rounding (0.65x)."""
    c = codec("Q2_K")
    x = weights(64, 256, seed=1)
    w = np.ones(256, dtype=np.float32)
    w[::2] = 100.0
    err = (c.dequantize(c.quantize_quick(x, w)) - x) ** 2
    assert err[:, ::2].mean() < 0.8 * err[:, 1::2].mean()
    x = weights(64, 1024, seed=6)
    imp = np.random.default_rng(6).gamma(0.5, size=1024).astype(np.float32)

    def weighted_error(raw):
        return float((imp * (c.dequantize(raw) - x) ** 2).mean())

    quick = weighted_error(c.quantize_quick(x, imp))
    assert quick < 1.2 * weighted_error(c.quantize(x, imp))
    assert quick < 0.8 * weighted_error(c.quantize(x, fit=False))


def test_residual_planes_are_weighted_too():
    """A residual plane's fit steers by importance as plane 1's does (with
    fewer candidate scales), and so level 4 keeps the heavy columns more
    accurate than the light ones; Q4_K (no weighted numpy fit) rounds a
    residual unweighted rather than searching it in ggml."""
    c = codec("Q2_K")
    x = weights(64, 256, seed=1)
    w = np.ones(256, dtype=np.float32)
    w[::2] = 100.0
    err = (c.dequantize(c.quantize_quick(x, w, residual=True)) - x) ** 2
    assert err[:, ::2].mean() < 0.8 * err[:, 1::2].mean()
    plan = NestedQuant((2, 4, 8))
    shifts = plane_shifts(plan, float(np.abs(x).max()))
    weighted = quantize_nested(x, plan, shifts, w)[1][1]
    plain = quantize_nested(x, plan, shifts)[1][1]
    # Measured 0.30 (1.24 with plane 2 unweighted) and 0.81 (1.54).
    err = (weighted - x) ** 2
    assert err[:, ::2].mean() < 0.5 * err[:, 1::2].mean()
    assert (w * err).mean() < (w * (plain - x) ** 2).mean()
    q4 = codec("Q4_K")
    assert np.array_equal(q4.quantize_quick(x, w, residual=True), q4.quantize_quick(x))


def test_weighted_quick_fit_checks_the_importance():
    c = codec("Q2_K")
    x = weights(4, 512)
    for bad in (np.ones(256), np.full(512, np.nan), -np.ones(512)):
        with pytest.raises(ConfigError, match="importance matrix must be 512"):
            c.quantize_quick(x, bad)
    # Q4_K has no weighted numpy fit: plane 1 of a 4-bit-first plan is ggml's.
    imp = np.linspace(0.1, 2, 512, dtype=np.float32)
    assert np.array_equal(
        codec("Q4_K").quantize_quick(x, imp), codec("Q4_K").quantize(x, imp)
    )


@pytest.mark.parametrize("levels", PLANS, ids=[",".join(map(str, p)) for p in PLANS])
def test_levels_reconstruct_bit_for_bit(levels):
    plan = NestedQuant(levels)
    x = weights(48, 512, seed=2)
    nt, refs = quantize_nested(x, plan, plane_shifts(plan, float(np.abs(x).max())))
    errors = []
    for level, ref in zip(plan.levels, refs):
        assert np.array_equal(reconstruct(nt, plan, level), ref)
        errors.append(float(np.sqrt(np.mean((ref - x) ** 2))))
    # Each level refines the one below it.
    assert all(b < a for a, b in zip(errors, errors[1:]))


def test_level_bytes_prefix_and_accounting():
    plan = NestedQuant((2, 4, 8))
    assert [p.name for p in plan.planes] == ["Q2_K", "Q2_K", "Q4_K"]
    n, k = 512, 2048
    full = plan.level_bytes(8, n, k)
    for b in plan.levels:
        assert plan.level_bytes(b, n, k) <= (b / 8 + 0.2) * full
    assert plan.level_bytes(2, n, k) == n * k // 256 * 84


@pytest.mark.parametrize(
    "text,message",
    [
        ("2,3,4", "adds 1 bits"),
        ("4,2", "strictly increasing"),
        ("2,4,x", "comma-separated"),
        ("", "comma-separated"),
        ("2,4,5", "adds 1 bits"),
    ],
    ids=["one-bit-step", "decreasing", "not-a-number", "empty", "odd-step"],
)
def test_bad_levels_strings(text, message):
    with pytest.raises(ConfigError, match=message):
        NestedQuant.parse(text)


def test_rows_not_a_multiple_of_the_block_are_refused():
    plan = NestedQuant((2, 4, 8))
    with pytest.raises(ConfigError, match="multiple of 256"):
        quantize_nested(weights(4, 320), plan, (0, 2, 4))


def test_small_weights_keep_their_precision():
    """Tiny weights (1e-4) would push fp16 block scales into subnormals; the
    per-plane power-of-two shift keeps every level as accurate as at 0.02."""
    plan = NestedQuant((2, 4, 8))
    for scale in (0.02, 1e-4):
        x = weights(32, 256) * (scale / 0.02)
        _, refs = quantize_nested(x, plan, plane_shifts(plan, float(np.abs(x).max())))
        rel = np.sqrt(np.mean((refs[-1] - x) ** 2) / np.mean(x**2))
        assert rel < 0.01, (scale, rel)


@pytest.mark.parametrize(
    "levels,n,k,t",
    [
        ((2, 4, 8), 64, 256, 1),
        ((2, 4, 8), 32, 512, 3),
        ((4, 8), 16, 1024, 2),
        ((2, 4, 6, 8), 24, 256, 1),
        ((8,), 32, 512, 2),
    ],
    ids=["248-256x64", "248-512x32-T3", "48-1024", "2468", "8-Q8_0"],
)
def test_ggml_sum_of_planes_matches_dequantized_matmul(levels, n, k, t):
    """Level L computed by ggml as the sum of per-plane matmuls (each scaled by
    its shift) equals the dequantized level weights times the activations
    quantized the way ggml quantizes them: within 1e-5 relative."""
    from edgemoe.runtime.device import Device, WeightSet
    from edgemoe.runtime.graph import Graph

    plan = NestedQuant(levels)
    w = weights(n, k, seed=3)
    nt, _ = quantize_nested(w, plan, plane_shifts(plan, float(np.abs(w).max())))
    x = aligned_empty((t, k), np.float32)
    x[...] = np.random.default_rng(4).standard_normal((t, k))
    dev = Device("cpu", 2)
    ws = WeightSet(dev, len(plan.planes))
    handles = []
    for bt, raw in zip(plan.planes, nt.planes):
        data = aligned_empty(raw.shape, np.uint8)
        data[...] = raw
        handles.append(ws.add(Weight(bt.name, bt.ggml, (n, k), data)))
    for level in plan.levels:
        g = Graph(dev)
        xin = g.input(x)
        acc = None
        ref = np.zeros((t, n), dtype=np.float64)
        for p in range(plan.n_planes(level)):
            y = g.mul_mat(handles[p], xin)
            y = g.scale(y, 2.0 ** -nt.shifts[p])
            acc = y if acc is None else g.add(acc, y)
            bt = plan.planes[p]
            plane = codec(bt.name).dequantize(nt.planes[p]) * 2.0 ** -nt.shifts[p]
            xq = q8(x, 32 if bt.name == "Q8_0" else 256)
            ref += xq.astype(np.float64) @ plane.T.astype(np.float64)
        out = aligned_empty((t, n), np.float32)
        g.output(acc, out)
        g.build()
        g.compute()
        g.free()
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert rel < 1e-5, (level, rel)


@pytest.mark.parametrize(
    "rows, imatrix, needle",
    [
        (np.full((2, 256), np.nan, np.float32), None, "NaN or infinite values"),
        (np.ones((2, 250), np.float32), None, "multiple of 256 values"),
        (np.ones((2, 256), np.float32), np.ones(128, np.float32), "must be 256 finite"),
    ],
)
def test_bad_rows_are_refused_before_ggml_quantizes(rows, imatrix, needle):
    """ggml's quantizers are never handed rows they would misread: one typed
    line instead of a crash in C or silent garbage."""
    from edgemoe.errors import ConfigError
    from edgemoe.quant.ggml_quant import quantize

    with pytest.raises(ConfigError) as info:
        quantize(rows, BLOCK_TYPES["Q2_K"].ggml, imatrix)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", CODECS, ids=CODECS)
def test_ggml_dequantize_matches_numpy(name):
    """The codecs dequantize with ggml's own C rows; numpy's ggml-order
    reconstruction gives the same floats bit for bit."""
    c = codec(name)
    raw = c.quantize(weights(16, 512, seed=5))
    assert np.array_equal(c.dequantize(raw), c.dequantize_numpy(raw))


QUICK = ["Q2_K", "Q4_K"]
# Squared error of the quick fit against ggml's reference rounding on
# Gaussian weights (measured 1.00 and 1.13): a regression bound.
MAX_QUICK_MSE_RATIO = {"Q2_K": 1.06, "Q4_K": 1.18}


@pytest.mark.parametrize("name", QUICK, ids=QUICK)
def test_quick_fit_is_ggml_layout_near_ggml_rounding(name):
    """The numpy fit of the residual planes writes blocks gguf-py reads as
    we do, about as accurate as ggml's own reference rounding."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    c = codec(name)
    x = weights(64, 1024, seed=6)
    raw = c.quantize_quick(x)
    assert raw.shape == (64, BLOCK_TYPES[name].row_bytes(1024))
    ours = c.dequantize(raw)
    ref = dequantize(raw, GGMLQuantizationType[name]).reshape(ours.shape)
    assert np.array_equal(ours, ref)
    mse = np.mean((ours - x) ** 2)
    ggml_mse = np.mean((c.dequantize(c.quantize(x, fit=False)) - x) ** 2)
    assert mse < MAX_QUICK_MSE_RATIO[name] * ggml_mse


@pytest.mark.parametrize("name", QUICK, ids=QUICK)
def test_quick_fit_keeps_flat_and_zero_blocks(name):
    """All-zero blocks, flat sub-blocks of either sign and a lone spike come
    back within fp16 precision (no sub-block is fit by a zero scale)."""
    x = np.zeros((4, 512), np.float32)
    x[1, :256] = -0.5  # flat negative: offset only
    x[2, :48] = 0.25  # flat positive sub-blocks: scale only
    x[3, 300] = 1.0
    out = codec(name).dequantize(codec(name).quantize_quick(x))
    assert np.abs(out - x).max() < 2e-3
    assert not out[0].any()


@pytest.mark.parametrize("name", ["Q6_K", "Q8_0"], ids=["Q6_K", "Q8_0"])
def test_quick_fit_falls_back_to_ggml_rounding(name):
    x = weights(8, 512, seed=7)
    c = codec(name)
    assert np.array_equal(c.quantize_quick(x), c.quantize(x, fit=False))
