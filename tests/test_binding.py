"""The ctypes ggml binding and the validated Graph API (runtime/graph.py).

A ggml assertion aborts the whole process, so every check here that a bad call
raises GGMLError first ran in a subprocess; cases that still abort run in one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from edgemoe import ggml_binding as gb
from edgemoe.checkpoint.base import GGML_F32, Weight, aligned_empty
from edgemoe.errors import GGMLError
from edgemoe.runtime.device import Device, WeightSet
from edgemoe.runtime.graph import Graph

Q8 = GGMLQuantizationType.Q8_0
K, N, M = 64, 8, 3  # reduction dim (two Q8_0 blocks), output rows, tokens
E, U, T = 4, 2, 5  # experts, experts per token, tokens


@pytest.fixture(scope="module")
def device():
    dev = Device("cpu", n_threads=2)
    yield dev
    dev.close()


@pytest.fixture
def weights(device):
    ws = WeightSet(device, capacity=8)
    yield ws
    ws.free()


@pytest.fixture
def graph(device):
    g = Graph(device, n_tensors=32)
    yield g
    g.free()


def aligned(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return aligned(rng.standard_normal(shape).astype(np.float32))


def f32_weight(name: str, a: np.ndarray) -> Weight:
    return Weight(name, GGML_F32, a.shape, a)


def q8_weight(name: str, a: np.ndarray) -> tuple[Weight, np.ndarray]:
    """The Q8_0 weight of ``a`` and its dequantized values."""
    q = aligned(quantize(a, Q8))
    return Weight(name, int(Q8), a.shape, q), dequantize(q, Q8).reshape(a.shape)


def q8_round_trip(x: np.ndarray) -> np.ndarray:
    """What ggml does to activations before a Q8_0 dot product."""
    return dequantize(quantize(x, Q8), Q8).reshape(x.shape)


# -- the binding itself ----------------------------------------------------------


def test_self_test_runs_on_the_installed_ggml():
    g = gb.lib()
    assert gb.lib() is g  # loaded once
    gb.self_test(g)  # raises GGMLError on any mismatch
    assert g.ggml_blck_size(gb.Q8_0) == 32 and g.ggml_type_size(gb.Q8_0) == 34


class _WrongTypeSizes:
    """The real library, except that Q8_0 blocks report a different size."""

    def __init__(self, g):
        self._g = g

    def __getattr__(self, name):
        return getattr(self._g, name)

    def ggml_type_size(self, t):
        return 36 if t == gb.Q8_0 else self._g.ggml_type_size(t)


def test_self_test_refuses_a_mismatching_ggml():
    with pytest.raises(GGMLError, match="unsupported ggml version"):
        gb.self_test(_WrongTypeSizes(gb.lib()))


# -- numerics against numpy ---------------------------------------------------------


def test_mul_mat_f32_matches_numpy(device, weights, graph):
    w, x = randn(N, K, seed=1), randn(M, K, seed=2)
    tw = weights.add(f32_weight("w", w))
    out = aligned_empty((M, N), np.float32)
    graph.output(graph.mul_mat(tw, graph.input(x)), out)
    graph.build()
    graph.compute()
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_mul_mat_q8_0_matches_dequantized_numpy(device, weights, graph):
    w, x = randn(N, K, seed=3), randn(M, K, seed=4)
    wq, wdq = q8_weight("wq", w)
    tw = weights.add(wq)
    out = aligned_empty((M, N), np.float32)
    graph.output(graph.mul_mat(tw, graph.input(x)), out)
    graph.build()
    graph.compute()
    ref = q8_round_trip(x).astype(np.float64) @ wdq.astype(np.float64).T
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # The tolerance is far below the quantization error it would otherwise hide.
    assert np.abs(out - x @ w.T).max() > 100 * 1e-5


def mul_mat_id_ref(experts: np.ndarray, b: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """out[t, u] = experts[ids[t, u]] @ b[t, u % b.shape[1]]."""
    rows = b[:, np.arange(ids.shape[1]) % b.shape[1]].astype(np.float64)
    return np.einsum("tunk,tuk->tun", experts[ids].astype(np.float64), rows)


@pytest.mark.parametrize("b_rows", [1, U], ids=["broadcast_input", "input_per_slot"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_mul_mat_id_matches_numpy(device, weights, graph, qtype, b_rows):
    ex = randn(E, N, K, seed=5)
    if qtype == "F32":
        w, ex_ref = f32_weight("ex", ex), ex
    else:
        w, ex_ref = q8_weight("ex", ex)
    te = weights.add(w)
    b = randn(T, b_rows, K, seed=6)
    ids = aligned(np.random.default_rng(7).integers(0, E, (T, U)).astype(np.int32))
    ids[0] = [0, E - 1]  # both ends of the range
    out = aligned_empty((T, U, N), np.float32)
    graph.output(graph.mul_mat_id(te, graph.input(b), graph.ids(ids, E)), out)
    graph.build()
    graph.compute()
    b_ref = b if qtype == "F32" else q8_round_trip(b)
    np.testing.assert_allclose(
        out, mul_mat_id_ref(ex_ref, b_ref, ids), rtol=1e-5, atol=1e-5
    )


def test_graph_reuse_reads_rewritten_inputs(device, weights, graph):
    ex = randn(E, N, K, seed=8)
    te = weights.add(f32_weight("ex", ex))
    b = randn(T, 1, K, seed=9)
    ids = aligned(np.zeros((T, U), dtype=np.int32))
    ids[:] = [0, 1]
    scale = randn(1, 1, N, seed=10)
    out = aligned_empty((T, U, N), np.float32)
    y = graph.mul(
        graph.mul_mat_id(te, graph.input(b), graph.ids(ids, E)), graph.input(scale)
    )
    graph.output(y, out)
    graph.build()
    results = []
    for step in range(3):
        b[...] = np.random.default_rng(100 + step).standard_normal(b.shape)
        ids[...] = np.random.default_rng(200 + step).integers(0, E, ids.shape)
        graph.compute()
        ref = mul_mat_id_ref(ex, b, ids) * scale
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        results.append(out.copy())
    assert not np.allclose(results[0], results[1])


def test_elementwise_ops_match_numpy(device, graph):
    x, w = randn(M, K, seed=11), randn(K, seed=12)
    out = aligned_empty((M, K), np.float32)
    tx = graph.input(x)
    normed = graph.mul(graph.rms_norm(tx, 1e-5), graph.input(w))
    y = graph.add(graph.swiglu(normed, graph.scale(tx, 0.5)), graph.sigmoid(tx))
    graph.output(y, out)
    graph.build()
    graph.compute()
    x64 = x.astype(np.float64)
    n = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-5) * w
    silu = n / (1 + np.exp(-n))
    ref = silu * (0.5 * x64) + 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# -- validation: GGMLError instead of a ggml abort ---------------------------------


def test_mul_mat_shape_mismatch(weights, graph):
    tw = weights.add(f32_weight("w", randn(N, K)))
    with pytest.raises(GGMLError, match="mul_mat"):
        graph.mul_mat(tw, graph.input(randn(M, K + 32)))


def test_mul_mat_rejects_non_f32_activations(weights, graph):
    tw = weights.add(f32_weight("w", randn(N, K)))
    with pytest.raises(GGMLError, match="float32"):
        graph.mul_mat(tw, graph.input(aligned(np.ones((M, K), np.int32))))


@pytest.mark.parametrize(
    "b_shape, ids_shape, ids_dtype",
    [
        ((T, 1, K + 32), (T, U), np.int32),  # row length differs from experts'
        ((T + 1, 1, K), (T, U), np.int32),  # one id row per input row
        ((T, 3, K), (T, U), np.int32),  # U not a multiple of input rows
        ((T, 1, K), (T, U), np.float32),  # ids must be int32
        ((T, 1, K), (2, T, U), np.int32),  # ids must be 2-D
    ],
    ids=["row_length", "token_count", "broadcast", "ids_dtype", "ids_3d"],
)
def test_mul_mat_id_shape_mismatch(weights, graph, b_shape, ids_shape, ids_dtype):
    te = weights.add(f32_weight("ex", randn(E, N, K)))
    b = graph.input(randn(*b_shape))
    ids = graph.input(aligned(np.zeros(ids_shape, dtype=ids_dtype)))
    with pytest.raises(GGMLError, match="mul_mat_id"):
        graph.mul_mat_id(te, b, ids)


@pytest.mark.parametrize("bad", [E, -1, 10**6], ids=["E", "minus_one", "huge"])
def test_out_of_range_expert_ids_raise_at_compute(weights, graph, bad):
    te = weights.add(f32_weight("ex", randn(E, N, K)))
    ids = aligned(np.zeros((T, U), dtype=np.int32))
    out = aligned_empty((T, U, N), np.float32)
    graph.output(
        graph.mul_mat_id(te, graph.input(randn(T, 1, K)), graph.ids(ids, E)), out
    )
    graph.build()
    graph.compute()  # all zeros: fine
    ids[T - 1, U - 1] = bad
    with pytest.raises(GGMLError, match="out of range"):
        graph.compute()
    ids[T - 1, U - 1] = E - 1
    graph.compute()  # usable again once the ids are valid


def misaligned(shape, dtype=np.float32) -> np.ndarray:
    """A C-contiguous array whose data pointer is 4 bytes past 32-alignment."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = aligned_empty((n + 64,), np.uint8)
    a = raw[4 : 4 + n].view(dtype).reshape(shape)
    assert a.ctypes.data % 32 == 4 and a.flags.c_contiguous
    return a


def test_binding_a_misaligned_input_raises(graph):
    with pytest.raises(GGMLError, match="aligned"):
        graph.input(misaligned((M, K)))


def test_binding_a_misaligned_output_raises(graph):
    y = graph.scale(graph.input(randn(M, K)), 2.0)
    with pytest.raises(GGMLError, match="aligned"):
        graph.output(y, misaligned((M, K)))


def test_adding_a_misaligned_weight_raises(weights):
    with pytest.raises(GGMLError, match="aligned"):
        weights.add(f32_weight("w", misaligned((N, K))))


def test_binding_a_non_contiguous_array_raises(graph):
    with pytest.raises(GGMLError, match="contiguous"):
        graph.input(randn(K, M).T)


def test_weight_bytes_must_hold_the_shape(weights):
    data = aligned_empty((100,), np.uint8)  # Q8_0 [2, 32] needs 68 bytes
    with pytest.raises(GGMLError, match="do not hold"):
        weights.add(Weight("w", int(Q8), (2, 32), data))


@pytest.mark.parametrize("ne", [(3, 7), (4, 4, 4), (M * K + 1, 1)], ids=str)
def test_reshape_with_wrong_element_count(graph, ne):
    x = graph.input(randn(M, K))
    with pytest.raises(GGMLError, match="reshape"):
        graph.reshape(x, *ne)
    assert graph.reshape(x, K // 2, 2 * M).ne == (K // 2, 2 * M, 1, 1)


def test_broadcast_mismatch(graph):
    x, w = graph.input(randn(M, K)), graph.input(randn(K + 1))
    for op in (graph.add, graph.mul):
        with pytest.raises(GGMLError, match="broadcast"):
            op(x, w)


def test_output_array_must_match(graph):
    y = graph.scale(graph.input(randn(M, K)), 2.0)
    with pytest.raises(GGMLError, match="does not match"):
        graph.output(y, aligned_empty((K, M), np.float32))


def test_context_capacity_is_checked(device):
    g = Graph(device, n_tensors=4)
    try:
        x = g.input(randn(1, K))
        with pytest.raises(GGMLError, match="holds 4 tensors"):
            for _ in range(10):
                x = g.scale(x, 1.0)
    finally:
        g.free()


# -- cases that abort the process today (each in a subprocess) -------------------

_PRELUDE = """
import numpy as np
from edgemoe.runtime.device import Device
from edgemoe.runtime.graph import Graph
from edgemoe.checkpoint.base import aligned_empty
from edgemoe.errors import GGMLError

def arr(shape, dtype=np.float32):
    a = aligned_empty(shape, dtype)
    a[...] = 1
    return a

dev = Device("cpu", 1)
g = Graph(dev)
out = arr((4, 32))
try:
{body}
    print("NO-ERROR")
except GGMLError as e:
    print("GGMLError:", e)
"""

_ABORTING = {
    "compute_before_build": """
x = g.input(arr((4, 32)))
g.output(g.scale(x, 2.0), out)
g.compute()
""",
    "unary_op_on_int32": """
x = g.input(arr((4, 32), np.int32))
g.output(g.sigmoid(x), out)
g.build()
g.compute()
""",
    "scale_on_int32": """
x = g.input(arr((4, 32), np.int32))
g.output(g.scale(x, 2.0), out)
g.build()
g.compute()
""",
    "mul_mat_int32_weights": """
a = g.input(arr((8, 32), np.int32))
g.output(g.mul_mat(a, g.input(arr((4, 32)))), arr((4, 8)))
g.build()
g.compute()
""",
    "input_as_output": """
x = g.input(arr((4, 32)))
g.output(x, out)
""",
    "compute_after_free": """
x = g.input(arr((4, 32)))
g.output(g.scale(x, 2.0), out)
g.build()
g.free()
g.compute()
""",
    "ids_not_from_graph_ids": """
# ids bound with input() are never range-checked: id 5 of 3 experts reads
# past the expert weights.
from edgemoe.runtime.device import WeightSet
from edgemoe.checkpoint.base import Weight, GGML_F32
ws = WeightSet(dev, 2)
te = ws.add(Weight("ex", GGML_F32, (3, 8, 32), arr((3, 8, 32))))
ids = arr((4, 1), np.int32)
ids[...] = 5
y = g.mul_mat_id(te, g.input(arr((4, 1, 32))), g.input(ids))
g.output(y, arr((4, 1, 8)))
g.build()
g.compute()
""",
    "more_nodes_than_the_context_holds": """
g = Graph(dev, n_tensors=64)
x = g.input(arr((4, 32)))
for _ in range(100):
    x = g.scale(x, 1.0)
g.output(x, out)
g.build()
""",
    "a context too large": """
Graph(dev, n_tensors=Graph.MAX_TENSORS + 1)
""",
}


def run_isolated(body: str, tmp_path) -> subprocess.CompletedProcess:
    code = _PRELUDE.format(body=textwrap.indent(body.strip(), "    "))
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # off the repo root, where `edgemoe` is the bare folder
    )


@pytest.mark.parametrize("case", sorted(_ABORTING), ids=sorted(_ABORTING))
def test_invalid_graphs_raise_instead_of_aborting(case, tmp_path):
    proc = run_isolated(_ABORTING[case], tmp_path)
    if proc.returncode > 0:  # a Python error in the case itself, not a crash
        pytest.fail(f"case failed in Python: {proc.stderr[-500:]}")
    assert proc.returncode == 0, f"killed by signal {-proc.returncode}"
    assert "GGMLError:" in proc.stdout


def test_isolated_runner_reports_graph_errors(tmp_path):
    """The subprocess harness above sees a GGMLError when one is raised."""
    proc = run_isolated("x = g.input(arr((4, 32)))\ng.reshape(x, 3, 3)", tmp_path)
    assert proc.returncode == 0, proc.stderr[-300:]
    assert "GGMLError: reshape" in proc.stdout


@pytest.mark.parametrize(
    "qtype",
    [
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q6_K,
    ],
)
def test_ggml_row_dequantizer_matches_gguf_numpy(qtype):
    """The embedding rows a step reads are dequantized by ggml's own C
    (``to_float_fn``, its type traits read through the binding); they equal
    gguf-py's numpy dequantizer, written independently of ggml's C."""
    g = gb.lib()
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((3, 512)).astype(np.float32)
    raw = np.zeros((3, g.ggml_row_size(int(qtype), 512)), np.uint8)
    g.ggml_quantize_chunk(int(qtype), x.ctypes.data, raw.ctypes.data, 0, 3, 512, None)
    fn = g.to_float_fn(int(qtype))
    assert fn is not None
    out = np.zeros((3, 512), np.float32)
    fn(raw.ctypes.data, out.ctypes.data, out.size)
    np.testing.assert_array_equal(out, dequantize(raw, qtype).reshape(3, 512))


def test_row_dequantizer_is_none_where_ggml_has_none():
    """F32 has no dequantizer: callers copy its rows."""
    assert gb.lib().to_float_fn(GGML_F32) is None
