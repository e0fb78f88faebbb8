"""ggml devices, model weights and reusable graphs, validated in Python.

Every op checks in Python what ggml would assert (an assertion aborts the
process). A ``Graph`` is built once for fixed shapes and re-run: its inputs and
outputs are numpy arrays bound zero-copy on a host device, so a run is "write
the inputs, compute, read the outputs" with no copies and no rebuild.

Non-host devices (CUDA through ggml's registry) take the same calls: weights are
uploaded once, inputs/outputs are copied per run. That path cannot be run on the
machines this project is developed on and is untested.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from edgemoe.checkpoint.base import Weight
from edgemoe.errors import GGMLError
from edgemoe.runtime import ggml_binding as gb
from edgemoe.runtime.ggml_binding import (
    F32,
    I32,
    TENSOR_ALIGNMENT,
    InitParams,
    TensorMirror,
)
from edgemoe.runtime.step_ops import StepOps

_DTYPE_TO_GGML = {np.dtype(np.float32): F32, np.dtype(np.int32): I32}
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


# Types ggml's CPU_REPACK buffer may lay out for its interleaved kernels
# (Q4_0, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K, IQ4_NL, MXFP4); whether it does for a
# tensor depends on the CPU, and WeightSet.finalize asks ggml per tensor.
REPACK_TYPES = frozenset({2, 8, 10, 12, 13, 14, 20, 39})


def _need_f32(op: str, *ts: T) -> None:
    if any(t.qtype != F32 for t in ts):
        raise GGMLError(f"{op}: operands must be float32")


@dataclass(frozen=True)
class T:
    """Python-side handle of a ggml tensor: pointer, type and ``ne`` (4 dims)."""

    ptr: int
    qtype: int
    ne: tuple[int, int, int, int]
    contiguous: bool = True
    view: bool = False
    """Shares another tensor's data (reshape, views): never a graph output."""

    @property
    def n(self) -> int:
        return self.ne[0] * self.ne[1] * self.ne[2] * self.ne[3]


def ne_of(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """numpy shape (slowest first) -> ggml ``ne`` (fastest first), padded to 4."""
    if not 1 <= len(shape) <= 4:
        raise GGMLError(f"ggml tensors have 1 to 4 dims, got shape {shape}")
    ne = tuple(int(d) for d in reversed(shape))
    return ne + (1,) * (4 - len(ne))  # type: ignore[return-value]


def default_threads() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:
        n = None
    return max(1, n or os.cpu_count() or 1)


class Device:
    """One ggml backend chosen through ggml's device registry.

    ``kind`` is "cpu", "gpu" (first GPU/iGPU device; untested here) or "auto"
    (a GPU if ggml has one, else the CPU).
    """

    def __init__(self, kind: str = "cpu", n_threads: int | None = None):
        """``n_threads``: compute threads; None tunes them per graph between
        the physical core count and 1 (runtime/threads.py)."""
        from edgemoe.runtime.threads import ThreadTuner, limit_blas_threads

        limit_blas_threads(1)
        self.g = gb.lib()
        devices = self.g.devices()
        wanted = {"cpu": (gb.DEV_CPU,), "gpu": (gb.DEV_GPU, gb.DEV_IGPU)}
        if kind == "auto":
            order = [(gb.DEV_GPU, gb.DEV_IGPU), (gb.DEV_CPU,)]
        elif kind in wanted:
            order = [wanted[kind]]
        else:
            raise GGMLError(f"device must be 'cpu', 'gpu' or 'auto', got {kind!r}")
        pick = next((d for types in order for d in devices if d[3] in types), None)
        if pick is None:
            names = ", ".join(f"{d[1]} ({d[2]})" for d in devices) or "none"
            raise GGMLError(f"no ggml {kind} device; this ggml has: {names}")
        self.dev, self.name, self.description, self.type = pick
        self.is_host = self.type == gb.DEV_CPU
        self.backend = self.g.ggml_backend_dev_init(self.dev, None)
        if not self.backend:
            raise GGMLError(f"could not start the ggml {self.name} backend")
        self.n_threads = n_threads or default_threads()
        self._set_threads = self.g.set_n_threads_fn(self.dev)
        self._threads_now = 0
        self.set_threads(self.n_threads)
        fixed = n_threads is not None or self._set_threads is None
        self.tuner = ThreadTuner(self.n_threads, fixed)
        self.buffer_type = self.g.ggml_backend_get_default_buffer_type(self.backend)
        self.repack_buft = self.g.repack_buffer_type(self.dev) if self.is_host else None
        """ggml's CPU_REPACK buffer type, or None (other devices, old ggml)."""
        self._repacks: dict[int, bool] = {}

    def repacks(self, qtype: int) -> bool:
        """Whether ggml's CPU_REPACK buffer lays out ``qtype`` weights (rows
        a multiple of 8) for this CPU: asked once per type, of one small
        tensor, since laying out a tensor it does not repack aborts."""
        if self.repack_buft is None or qtype not in REPACK_TYPES:
            return False
        known = self._repacks.get(qtype)
        if known is None:
            g = self.g
            ctx = _Context(self, 1)
            try:
                t = ctx.new(qtype, (int(g.ggml_blck_size(qtype)) * 8, 8, 1, 1))
                buf = g.ggml_backend_alloc_ctx_tensors_from_buft(
                    ctx.ctx, self.repack_buft
                )
                known = bool(buf) and bool(TensorMirror.from_address(t.ptr).extra)
                if buf:
                    g.ggml_backend_buffer_free(buf)
            finally:
                ctx.free()
            self._repacks[qtype] = known
        return known

    def set_threads(self, n: int) -> None:
        if n != self._threads_now and self._set_threads is not None:
            self._set_threads(self.backend, n)
            self._threads_now = n

    def new_allocator(self) -> int:
        """A ggml graph allocator for intermediates; graphs run one after the
        other may share one, its buffer grows to the largest graph."""
        galloc = self.g.ggml_gallocr_new(self.buffer_type)
        if not galloc:
            raise GGMLError("ggml_gallocr_new failed")
        return galloc

    def free_allocator(self, galloc: int) -> None:
        self.g.ggml_gallocr_free(galloc)

    def close(self) -> None:
        if self.backend:
            self.g.ggml_backend_free(self.backend)
            self.backend = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Context:
    """A metadata-only ggml context plus the host buffers wrapping numpy memory."""

    def __init__(self, device: Device, n_tensors: int, graph_size: int = 0):
        self.device = device
        self.g = device.g
        size = self.g.ggml_tensor_overhead() * n_tensors + 1024
        if graph_size:
            size += self.g.ggml_graph_overhead_custom(graph_size, False)
        self.ctx = self.g.ggml_init(InitParams(size, None, True))
        if not self.ctx:
            raise GGMLError("ggml_init failed")
        self.capacity = n_tensors
        self.used = 0
        self._buffers: dict[int, tuple[int, int, int]] = {}  # id(base) -> buf
        self._keep: list[np.ndarray] = []

    def _count(self, n: int = 1) -> None:
        self.used += n
        if self.used > self.capacity:
            raise GGMLError(
                f"ggml context holds {self.capacity} tensors, asked for more"
            )

    def new(self, qtype: int, ne: tuple[int, int, int, int]) -> T:
        g = self.g
        blk = g.ggml_blck_size(qtype)
        if ne[0] % blk:
            raise GGMLError(
                f"rows of {ne[0]} values do not split into ggml "
                f"{g.ggml_type_name(qtype).decode()} blocks of {blk}"
            )
        self._count()
        if ne[3] != 1:
            raise GGMLError("4-D tensors are not used")
        if ne[2] != 1:
            ptr = g.ggml_new_tensor_3d(self.ctx, qtype, *ne[:3])
        elif ne[1] != 1:
            ptr = g.ggml_new_tensor_2d(self.ctx, qtype, *ne[:2])
        else:
            ptr = g.ggml_new_tensor_1d(self.ctx, qtype, ne[0])
        return T(ptr, qtype, ne)

    def bind(self, t: T, array: np.ndarray, base: np.ndarray | None = None) -> None:
        """Point ``t`` at ``array``'s memory (host devices only), zero-copy.

        ``base`` is the allocation ``array`` lives in; one ggml buffer wraps it
        for all the tensors bound inside it.
        """
        g = self.g
        base = array if base is None else base
        addr, start = array.ctypes.data, base.ctypes.data
        if start % TENSOR_ALIGNMENT:
            raise GGMLError(
                f"buffer at {start:#x} is not {TENSOR_ALIGNMENT}-byte aligned"
            )
        if not array.flags.c_contiguous:
            raise GGMLError("tensors can only be bound to C-contiguous arrays")
        need = g.ggml_nbytes(t.ptr)
        if need != array.nbytes:
            raise GGMLError(f"tensor needs {need} bytes, array has {array.nbytes}")
        if not start <= addr or addr + need > start + base.nbytes:
            raise GGMLError("array lies outside the buffer it was bound through")
        key = start
        if key not in self._buffers:
            buf = g.ggml_backend_cpu_buffer_from_ptr(start, base.nbytes)
            if not buf:
                raise GGMLError("ggml_backend_cpu_buffer_from_ptr failed")
            self._buffers[key] = buf
            self._keep.append(base)
        if g.ggml_backend_tensor_alloc(self._buffers[key], t.ptr, addr) != 0:
            raise GGMLError("ggml_backend_tensor_alloc failed")

    def free(self) -> None:
        for buf in self._buffers.values():
            self.g.ggml_backend_buffer_free(buf)
        self._buffers.clear()
        if self.ctx:
            self.g.ggml_free(self.ctx)
            self.ctx = None
        self._keep.clear()


class WeightSet:
    """Model weights as ggml tensors, created once and shared by every graph.

    On the CPU a weight is bound zero-copy where it lies, or, with
    ``repack``, copied into ggml's CPU_REPACK buffer at ``finalize`` in the
    interleaved layout its matmul kernels read fastest (llama.cpp's default
    on this hardware). Elsewhere weights are uploaded at ``finalize``.
    """

    def __init__(self, device: Device, capacity: int, repack: bool = False):
        self.device = device
        self._ctx = _Context(device, capacity)
        self._uploads: list[tuple[T, np.ndarray]] = []
        self._device_buffer = None
        self.repack = repack and device.repack_buft is not None
        self._repack_ctx = _Context(device, capacity) if self.repack else None
        self._repacks: list[tuple[T, np.ndarray]] = []
        self._repack_buffer = None
        self._device_tensors: list[T] = []
        self.nbytes = 0
        self.repacked_bytes = 0
        """Bytes ggml laid out for its interleaved kernels (a copy)."""

    def add(self, w: Weight, base: np.ndarray | None = None, repack: bool = True) -> T:
        """A ggml tensor over ``w``'s bytes; validates type, shape and size.
        ``repack=False`` keeps a weight in place even when repacking (slots
        the I/O threads refill, tables read on the host)."""
        g = self.device.g
        ne = ne_of(w.shape)
        rows = ne[1] * ne[2] * ne[3]
        blk = g.ggml_blck_size(w.qtype)
        if (
            blk <= 0
            or ne[0] % blk
            or g.ggml_row_size(w.qtype, ne[0]) * rows != w.nbytes
        ):
            raise GGMLError(
                f"tensor {w.name!r}: {w.nbytes} bytes do not hold "
                f"{g.ggml_type_name(w.qtype).decode()}{list(w.shape)}"
            )
        if w.data.nbytes != w.nbytes:
            raise GGMLError(f"tensor {w.name!r} is not in memory (read per row)")
        data = w.data if w.data.flags.c_contiguous else np.ascontiguousarray(w.data)
        self.nbytes += w.nbytes
        if (
            self.repack
            and repack
            and len(w.shape) in (2, 3)
            and ne[1] % 8 == 0
            and self.device.repacks(w.qtype)
        ):
            t = self._repack_ctx.new(w.qtype, ne)
            self._repacks.append((t, data))
            return t
        t = self._ctx.new(w.qtype, ne)
        if self.device.is_host:
            if data.ctypes.data % TENSOR_ALIGNMENT:
                raise GGMLError(f"tensor {w.name!r} data is not 32-byte aligned")
            self._ctx.bind(t, data, base)
        else:
            self._uploads.append((t, data))
        return t

    def add_device(self, name: str, qtype: int, shape: tuple[int, ...]) -> T:
        """A tensor with no host memory behind it: allocated in the device's
        own buffer at ``finalize``, zeroed, and written only through
        ``ggml_backend_tensor_set`` (expert slots on a GPU, or on the CPU in
        the CPU backend's buffer type)."""
        g = self.device.g
        ne = ne_of(shape)
        if g.ggml_blck_size(qtype) <= 0 or ne[0] % g.ggml_blck_size(qtype):
            raise GGMLError(f"tensor {name!r}: rows do not split into blocks")
        t = self._ctx.new(qtype, ne)
        self._device_tensors.append(t)
        self.nbytes += int(g.ggml_nbytes(t.ptr))
        return t

    def finalize(self) -> None:
        """Repack (CPU) or upload (other devices) what ``add`` deferred, and
        allocate ``add_device``'s tensors."""
        g = self.device.g
        if self._repacks:
            self._repack_buffer = g.ggml_backend_alloc_ctx_tensors_from_buft(
                self._repack_ctx.ctx, self.device.repack_buft
            )
            if not self._repack_buffer:
                raise GGMLError("could not allocate ggml's CPU_REPACK buffer")
            while self._repacks:
                t, data = self._repacks.pop(0)  # drop each source as it is copied
                mirror = TensorMirror.from_address(t.ptr)
                if not mirror.extra:  # Device.repacks said it would: a ggml change
                    raise GGMLError(f"ggml did not repack a type-{t.qtype} tensor")
                g.ggml_backend_tensor_set(t.ptr, data.ctypes.data, 0, data.nbytes)
                self.repacked_bytes += data.nbytes
        if not (self._uploads or self._device_tensors):
            return
        # Every tensor of the context not bound to host memory yet.
        self._device_buffer = g.ggml_backend_alloc_ctx_tensors(
            self._ctx.ctx, self.device.backend
        )
        if not self._device_buffer:
            raise GGMLError(
                f"could not allocate {self.nbytes} bytes on {self.device.name}"
            )
        g.ggml_backend_buffer_clear(self._device_buffer, 0)
        for t, data in self._uploads:
            g.ggml_backend_tensor_set(t.ptr, data.ctypes.data, 0, data.nbytes)
        self._uploads.clear()

    def free(self) -> None:
        for buf in (self._device_buffer, self._repack_buffer):
            if buf:
                self.device.g.ggml_backend_buffer_free(buf)
        self._device_buffer = self._repack_buffer = None
        self._ctx.free()
        if self._repack_ctx is not None:
            self._repack_ctx.free()


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
        self._ctx = _Context(device, n_tensors, self.graph_size)
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
        """A tensor reading ``array`` (float32 or int32, C-contiguous)."""
        qtype = _DTYPE_TO_GGML.get(array.dtype)
        if qtype is None:
            raise GGMLError(f"graph inputs are float32 or int32, got {array.dtype}")
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

    def swiglu(self, gate: T, up: T) -> T:
        """silu(gate) * up, fused."""
        if (
            gate.ne != up.ne
            or gate.qtype != up.qtype
            or not (gate.contiguous and up.contiguous)
        ):
            raise GGMLError(f"swiglu: gate {gate.ne} and up {up.ne} must match")
        ptr = self.g.ggml_swiglu_split(self._ctx.ctx, gate.ptr, up.ptr)
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
        else:
            raise GGMLError("reshape: 2 or 3 dims")
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

    def view_prefix(self, a: T, ne1: int) -> T:
        """The first ``ne1`` rows of each matrix of ``a`` [n0, n1, n2]: a
        strided view (contiguous when n2 == 1 or nothing is cut)."""
        if a.qtype != F32 or not a.contiguous or a.ne[3] != 1:
            raise GGMLError("view_prefix: contiguous 3-D float32 only")
        if not 0 < ne1 <= a.ne[1]:
            raise GGMLError(f"view_prefix: {ne1} rows of a tensor with {a.ne[1]}")
        nb1, nb2 = a.ne[0] * 4, a.ne[0] * a.ne[1] * 4
        ne = (a.ne[0], ne1, a.ne[2], 1)
        ptr = self.g.ggml_view_3d(self._ctx.ctx, a.ptr, *ne[:3], nb1, nb2, 0)
        return T(
            self._new_op(ptr, F32, ne).ptr,
            F32,
            ne,
            contiguous=ne1 == a.ne[1] or a.ne[2] == 1,
            view=True,
        )

    def acc_prefix(self, a: T, b: T) -> T:
        """``a`` [n0, n1, n2] with ``b`` [n0, m1, n2] (m1 <= n1) added to its
        first m1 rows of each matrix (ggml_acc)."""
        if a.qtype != F32 or b.qtype != F32 or not (a.contiguous and b.contiguous):
            raise GGMLError("acc_prefix: contiguous float32 operands only")
        if b.ne[0] != a.ne[0] or b.ne[1] > a.ne[1] or b.ne[2:] != a.ne[2:]:
            raise GGMLError(f"acc_prefix: ne {b.ne} does not fit in {a.ne}")
        nb1, nb2 = a.ne[0] * 4, a.ne[0] * a.ne[1] * 4
        ptr = self.g.ggml_acc(self._ctx.ctx, a.ptr, b.ptr, nb1, nb2, nb2 * a.ne[2], 0)
        return self._new_op(ptr, F32, a.ne)

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
