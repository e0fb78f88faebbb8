"""Reusable ggml graphs, validated in Python.

Every op checks in Python what ggml would assert (an assertion aborts the
process). A ``Graph`` is built once for fixed shapes and re-run: its inputs and
outputs are numpy arrays bound zero-copy on a host device, so a run is "write
the inputs, compute, read the outputs" with no copies and no rebuild. On other
devices inputs and outputs are copied per run (untested here).
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.errors import GGMLError
from edgemoe.ggml_binding import F16, F32, I32
from edgemoe.runtime.device import Context, Device, T, ne_of
from edgemoe.runtime.step_ops import StepOps

_DTYPE_TO_GGML = {
    np.dtype(np.float32): F32,
    np.dtype(np.float16): F16,  # attention masks
    np.dtype(np.int32): I32,
}
# Types ggml's CPU backend multiplies as weights: floats and block quants.
WEIGHT_TYPES = frozenset(
    {
        0,
        1,
        2,
        3,
        6,
        7,
        8,
        10,
        11,
        12,
        13,
        14,
        16,
        17,
        18,
        19,
        20,
        21,
        22,
        23,
        29,
        30,
        34,
        35,
        39,
    }
)


def _need_f32(op: str, *ts: T) -> None:
    if any(t.qtype != F32 for t in ts):
        raise GGMLError(f"{op}: operands must be float32")


class Graph(StepOps):
    """One ggml graph for fixed shapes; build once with the op methods, then
    ``compute()`` as often as needed after rewriting the bound input arrays."""

    MAX_TENSORS = 1 << 16

    def __init__(self, device: Device, n_tensors: int = 128, galloc: int | None = None):
        """``galloc``: a shared allocator (``Device.new_allocator``) for graphs
        that are built, run and freed one at a time; else the graph owns one."""
        if not 0 < n_tensors <= self.MAX_TENSORS:
            raise GGMLError(f"n_tensors must be in 1..{self.MAX_TENSORS}")
        # Every tensor can become a node: the graph holds more nodes than the
        # context holds tensors, so the context's limit is hit before ggml's.
        self.graph_size = n_tensors + 16
        self.device = device
        self.g = device.g
        self._ctx = Context(device, n_tensors, self.graph_size)
        self._inputs: list[tuple[T, np.ndarray]] = []
        self._outputs: list[tuple[T, np.ndarray]] = []
        self._ids: list[tuple[np.ndarray, int]] = []
        self._id_bound: dict[int, int] = {}
        self._id_stride: dict[int, int] = {}
        self._expand: list[T] = []
        self._bound: set[int] = set()
        self._graph = None
        self._freed = False
        self._shared_galloc = galloc
        self._galloc = None
        self._tune = device.tuner.new_state()

    # -- inputs and outputs -------------------------------------------------
    def input(self, array: np.ndarray, base: np.ndarray | None = None) -> T:
        """A tensor reading ``array`` (float32, float16 or int32, C-contiguous)."""
        qtype = _DTYPE_TO_GGML.get(array.dtype)
        if qtype is None:
            raise GGMLError(
                f"graph inputs are float32, float16 or int32, got {array.dtype}"
            )
        t = self._ctx.new(qtype, ne_of(array.shape))
        if self.device.is_host:
            self._ctx.bind(t, array, base)
        else:
            self.g.ggml_set_input(t.ptr)
        self._inputs.append((t, array))
        self._bound.add(t.ptr)
        return t

    def ids(
        self, array: np.ndarray, n_experts: int, base: np.ndarray | None = None
    ) -> T:
        """Expert ids for ``mul_mat_id``; range-checked before every compute,
        since ggml reads out of bounds silently on a bad id."""
        if array.dtype != np.int32:
            raise GGMLError(f"expert ids must be int32, got {array.dtype}")
        t = self.input(array, base)
        self._ids.append((array, n_experts))
        self._id_bound[t.ptr] = n_experts
        return t

    def output(self, t: T, array: np.ndarray, base: np.ndarray | None = None) -> None:
        """Make op result ``t`` land in ``array`` (float32, or int32 for an
        int32 result; same shape)."""
        want = np.int32 if t.qtype == I32 else np.float32
        if array.dtype != want or ne_of(array.shape) != t.ne:
            raise GGMLError(
                f"output array {array.dtype}{list(array.shape)} does not match "
                f"tensor ne {t.ne}"
            )
        if t.view or not t.contiguous:
            raise GGMLError("a view cannot be a graph output")
        if t.ptr in self._bound:
            raise GGMLError("this tensor is already bound (an input or an output)")
        self._bound.add(t.ptr)
        if self.device.is_host:
            self._ctx.bind(t, array, base)
        else:
            self.g.ggml_set_output(t.ptr)
        self._outputs.append((t, array))

    # -- ops (each validates what ggml would assert) -------------------------
    def _new_op(self, ptr: int, qtype: int, ne: tuple) -> T:
        self._ctx._count()
        if not ptr:
            raise GGMLError("ggml returned no tensor")
        return T(ptr, qtype, tuple(int(x) for x in ne))

    def mul_mat(self, a: T, b: T) -> T:
        """``a`` [K, N] (weights) x ``b`` [K, M] -> [N, M] in ggml order."""
        if a.qtype not in WEIGHT_TYPES:
            raise GGMLError(f"mul_mat: ggml type {a.qtype} is not a weight type")
        if a.ne[0] != b.ne[0] or b.ne[2] % a.ne[2] or b.ne[3] % a.ne[3]:
            raise GGMLError(f"mul_mat: cannot multiply ne {a.ne} by {b.ne}")
        if b.qtype != F32:
            raise GGMLError("mul_mat: activations must be float32")
        ptr = self.g.ggml_mul_mat(self._ctx.ctx, a.ptr, b.ptr)
        return self._new_op(ptr, F32, (a.ne[1], b.ne[1], b.ne[2], b.ne[3]))

    def mul_mat_id(self, experts: T, b: T, ids: T) -> T:
        """``experts`` [K, N, E], ``b`` [K, 1 or U, T], ``ids`` I32 [U, T] ->
        [N, U, T]: row t of ``b`` times expert ``ids[u, t]``."""
        bound = self._id_bound.get(ids.ptr)
        if bound is None or bound > experts.ne[2] or ids.ne[2:] != (1, 1):
            raise GGMLError(
                f"mul_mat_id: ids must come from Graph.ids() (range-checked) or "
                f"top_k over at most {experts.ne[2]} experts and be [U, T], got "
                f"ne {ids.ne}"
            )
        if experts.qtype not in WEIGHT_TYPES:
            raise GGMLError(
                f"mul_mat_id: ggml type {experts.qtype} is not a weight type"
            )
        if experts.ne[3] != 1 or b.ne[3] != 1 or b.qtype != F32:
            raise GGMLError("mul_mat_id: experts and input must be 3-D, input float32")
        if ids.ne[1] != b.ne[2] or experts.ne[0] != b.ne[0] or ids.ne[0] % b.ne[1]:
            raise GGMLError(
                f"mul_mat_id: shapes do not fit: experts {experts.ne}, "
                f"input {b.ne}, ids {ids.ne}"
            )
        if not experts.contiguous:
            raise GGMLError("mul_mat_id: experts must not be a transposed view")
        ptr = self.g.ggml_mul_mat_id(self._ctx.ctx, experts.ptr, b.ptr, ids.ptr)
        return self._new_op(ptr, F32, (experts.ne[1], ids.ne[0], b.ne[2], 1))

    def _broadcast(self, name: str, fn, a: T, b: T) -> T:
        if any(x % y for x, y in zip(a.ne, b.ne)):
            raise GGMLError(f"{name}: ne {b.ne} does not broadcast over {a.ne}")
        if a.qtype != F32 or b.qtype != F32:
            raise GGMLError(f"{name}: operands must be float32")
        return self._new_op(fn(self._ctx.ctx, a.ptr, b.ptr), F32, a.ne)

    def add(self, a: T, b: T) -> T:
        return self._broadcast("add", self.g.ggml_add, a, b)

    def mul(self, a: T, b: T) -> T:
        return self._broadcast("mul", self.g.ggml_mul, a, b)

    def scale(self, a: T, s: float) -> T:
        _need_f32("scale", a)
        return self._new_op(self.g.ggml_scale(self._ctx.ctx, a.ptr, s), F32, a.ne)

    def rms_norm(self, a: T, eps: float) -> T:
        if a.qtype != F32 or not a.contiguous:
            raise GGMLError("rms_norm: input must be contiguous float32")
        return self._new_op(self.g.ggml_rms_norm(self._ctx.ctx, a.ptr, eps), F32, a.ne)

    def swiglu(self, gate: T, up: T, oai: tuple[float, float] | None = None) -> T:
        """silu(gate) * up, fused; with ``oai`` = (alpha, limit) gpt-oss's
        clamped form: gate clamped above at limit, up to ±limit, then
        gate·σ(alpha·gate)·(up + 1)."""
        if (
            gate.ne != up.ne
            or gate.qtype != up.qtype
            or not (gate.contiguous and up.contiguous)
        ):
            raise GGMLError(f"swiglu: gate {gate.ne} and up {up.ne} must match")
        if oai is None:
            ptr = self.g.ggml_swiglu_split(self._ctx.ctx, gate.ptr, up.ptr)
        else:
            ptr = self.g.ggml_swiglu_oai(self._ctx.ctx, gate.ptr, up.ptr, *oai)
        return self._new_op(ptr, gate.qtype, gate.ne)

    def sigmoid(self, a: T) -> T:
        _need_f32("sigmoid", a)
        return self._new_op(self.g.ggml_sigmoid(self._ctx.ctx, a.ptr), a.qtype, a.ne)

    def reshape(self, a: T, *ne: int) -> T:
        if not a.contiguous or int(np.prod(ne)) != a.n:
            raise GGMLError(f"reshape: cannot view ne {a.ne} as {ne}")
        if len(ne) == 2:
            ptr = self.g.ggml_reshape_2d(self._ctx.ctx, a.ptr, *ne)
        elif len(ne) == 3:
            ptr = self.g.ggml_reshape_3d(self._ctx.ctx, a.ptr, *ne)
        elif len(ne) == 4:
            ptr = self.g.ggml_reshape_4d(self._ctx.ctx, a.ptr, *ne)
        else:
            raise GGMLError("reshape: 2 to 4 dims")
        t = self._new_op(ptr, a.qtype, tuple(ne) + (1,) * (4 - len(ne)))
        return T(t.ptr, t.qtype, t.ne, view=True)

    def view_2d(self, a: T, ne0: int, ne1: int, nb1: int, offset: int) -> T:
        """Rows of ``ne0`` floats, ``nb1`` bytes apart, from byte ``offset``."""
        if a.qtype != F32:
            raise GGMLError("view_2d: float32 only")
        end = offset + (ne1 - 1) * nb1 + ne0 * 4
        if offset < 0 or ne0 <= 0 or ne1 <= 0 or end > a.n * 4:
            raise GGMLError(
                f"view_2d: bytes {offset}..{end} outside a tensor of {a.n * 4}"
            )
        ptr = self.g.ggml_view_2d(self._ctx.ctx, a.ptr, ne0, ne1, nb1, offset)
        return T(
            self._new_op(ptr, F32, (ne0, ne1, 1, 1)).ptr,
            F32,
            (ne0, ne1, 1, 1),
            contiguous=nb1 == ne0 * 4,
            view=True,
        )

    def view_rows(self, a: T, start: int, n: int) -> T:
        """Rows ``start .. start + n - 1`` of each matrix of ``a`` [n0, n1,
        n2]: a strided view (contiguous when n2 == 1 or nothing is cut)."""
        if a.qtype != F32 or not a.contiguous or a.ne[3] != 1:
            raise GGMLError("view_rows: contiguous 3-D float32 only")
        if not (0 <= start and 0 < n and start + n <= a.ne[1]):
            raise GGMLError(
                f"view_rows: rows {start}..{start + n} of a tensor with {a.ne[1]}"
            )
        nb1, nb2 = a.ne[0] * 4, a.ne[0] * a.ne[1] * 4
        ne = (a.ne[0], n, a.ne[2], 1)
        ptr = self.g.ggml_view_3d(self._ctx.ctx, a.ptr, *ne[:3], nb1, nb2, start * nb1)
        return T(
            self._new_op(ptr, F32, ne).ptr,
            F32,
            ne,
            contiguous=n == a.ne[1] or a.ne[2] == 1,
            view=True,
        )

    # -- build and run -------------------------------------------------------
    def expand(self, t: T) -> None:
        """Compute ``t`` though no output reads it (a ``set_rows`` write)."""
        self._expand.append(t)

    def build(self) -> None:
        """Freeze the graph over its outputs and allocate intermediates."""
        g = self.g
        if self._freed or self._graph is not None:
            raise GGMLError("build() on a freed or already built graph")
        if not self._outputs:
            raise GGMLError("a graph needs at least one output")
        self._graph = g.ggml_new_graph_custom(self._ctx.ctx, self.graph_size, False)
        if not self._graph:
            raise GGMLError("ggml_new_graph_custom failed")
        for t in self._expand:
            g.ggml_build_forward_expand(self._graph, t.ptr)
        for t, _ in self._outputs:
            g.ggml_build_forward_expand(self._graph, t.ptr)
        if self._shared_galloc is None:
            self._galloc = self.device.new_allocator()
        galloc = self._shared_galloc or self._galloc
        # Plan for this graph explicitly: a shared allocator would otherwise reuse
        # the previous graph's plan whenever node counts and sizes happen to fit.
        if not g.ggml_gallocr_reserve(galloc, self._graph) or not (
            g.ggml_gallocr_alloc_graph(galloc, self._graph)
        ):
            raise GGMLError("ggml could not allocate the graph's intermediates")

    @property
    def scratch_bytes(self) -> int:
        galloc = self._shared_galloc or self._galloc
        return int(self.g.ggml_gallocr_get_buffer_size(galloc, 0)) if galloc else 0

    def compute(self) -> None:
        g = self.g
        if self._freed:
            raise GGMLError("compute() on a freed graph")
        if self._graph is None:
            raise GGMLError("compute() before build()")
        for array, n in self._ids:
            if array.size and (array.min() < 0 or array.max() >= n):
                raise GGMLError(
                    f"expert id {int(array.max() if array.max() >= n else array.min())}"
                    f" out of range 0..{n - 1}"
                )
        if not self.device.is_host:
            for t, a in self._inputs:
                g.ggml_backend_tensor_set(t.ptr, a.ctypes.data, 0, a.nbytes)
        tuner = self.device.tuner
        self.device.set_threads(tuner.threads)
        t0 = time.perf_counter()
        status = g.ggml_backend_graph_compute(self.device.backend, self._graph)
        tuner.record(self._tune, time.perf_counter() - t0)
        if status != 0:
            raise GGMLError(f"ggml graph compute failed (status {status})")
        if not self.device.is_host:
            for t, a in self._outputs:
                g.ggml_backend_tensor_get(t.ptr, a.ctypes.data, 0, a.nbytes)

    def free(self) -> None:
        if self._galloc:
            self.device.free_allocator(self._galloc)
            self._galloc = None
        self._ctx.free()
        self._graph = None
        self._freed = True
