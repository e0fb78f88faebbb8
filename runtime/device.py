"""ggml devices, tensor handles and model weights, validated in Python.

``Device`` is one ggml backend from ggml's registry; ``WeightSet`` holds a
model's weights as ggml tensors (bound zero-copy on the CPU, repacked where
ggml has faster kernels, uploaded elsewhere). Non-host devices (CUDA through
ggml's registry) take the same calls; that path cannot be run on the machines
this project is developed on and is untested.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edgemoe import ggml_binding as gb
from edgemoe.checkpoint.base import Weight
from edgemoe.errors import GGMLError
from edgemoe.ggml_binding import TENSOR_ALIGNMENT, InitParams, TensorMirror

# Types ggml's CPU_REPACK buffer may lay out for its interleaved kernels
# (Q4_0, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K, IQ4_NL, MXFP4); whether it does for a
# tensor depends on the CPU, and WeightSet.finalize asks ggml per tensor.
REPACK_TYPES = frozenset({2, 8, 10, 12, 13, 14, 20, 39})


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
            ctx = Context(self, 1)
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


class Context:
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


def release_pages(a: np.ndarray) -> None:
    """Give the whole pages inside ``a``'s bytes back to the kernel (Linux;
    elsewhere they stay)."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = -(-a.ctypes.data // page) * page
    end = (a.ctypes.data + a.nbytes) // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(
            ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED
        )


class WeightSet:
    """Model weights as ggml tensors, created once and shared by every graph.

    On the CPU a weight is bound zero-copy where it lies, or, with
    ``repack``, copied into ggml's CPU_REPACK buffer at ``finalize`` in the
    interleaved layout its matmul kernels read fastest (llama.cpp's default
    on this hardware). Elsewhere weights are uploaded at ``finalize``.
    """

    def __init__(self, device: Device, capacity: int, repack: bool = False):
        self.device = device
        self._ctx = Context(device, capacity)
        self._uploads: list[tuple[T, np.ndarray]] = []
        self._device_buffer = None
        self.repack = repack and device.repack_buft is not None
        self._repack_ctx = Context(device, capacity) if self.repack else None
        self._repacks: list[tuple[T, np.ndarray, bool]] = []
        self._repack_filled: list[T] = []
        self._repack_buffer = None
        self._device_tensors: list[T] = []
        self.nbytes = 0
        self.repacked_bytes = 0
        """Bytes ggml laid out for its interleaved kernels (a copy)."""

    def add(
        self,
        w: Weight,
        base: np.ndarray | None = None,
        repack: bool = True,
        release: bool = False,
    ) -> T:
        """A ggml tensor over ``w``'s bytes; validates type, shape and size.
        ``repack=False`` keeps a weight in place even when repacking (slots
        the I/O threads refill, tables read on the host). ``release``: once
        repacked, nothing reads ``w``'s bytes again; their whole pages are
        given back (``MADV_DONTNEED``: a mapped file's fault back in from it,
        a read buffer's would read zeros), so the copy does not hold the
        weight twice."""
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
        if repack and self._repackable(ne, w.qtype):
            t = self._repack_ctx.new(w.qtype, ne)
            self._repacks.append((t, data, release))
            return t
        t = self._ctx.new(w.qtype, ne)
        if self.device.is_host:
            if data.ctypes.data % TENSOR_ALIGNMENT:
                raise GGMLError(f"tensor {w.name!r} data is not 32-byte aligned")
            self._ctx.bind(t, data, base)
        else:
            self._uploads.append((t, data))
        return t

    def add_device(
        self, name: str, qtype: int, shape: tuple[int, ...], repack: bool = False
    ) -> T:
        """A tensor with no host memory behind it, allocated at ``finalize``,
        zeroed, and written only through ``write`` or
        ``ggml_backend_tensor_set``: in ggml's repacked layout with
        ``repack`` (where this set repacks and ggml has kernels for the type;
        then only whole-tensor writes), else in the device's own buffer
        (expert slots on a GPU, or on the CPU in its backend's buffer)."""
        g = self.device.g
        ne = ne_of(shape)
        if g.ggml_blck_size(qtype) <= 0 or ne[0] % g.ggml_blck_size(qtype):
            raise GGMLError(f"tensor {name!r}: rows do not split into blocks")
        if repack and self._repackable(ne, qtype):
            t = self._repack_ctx.new(qtype, ne)
            self._repack_filled.append(t)
        else:
            t = self._ctx.new(qtype, ne)
            self._device_tensors.append(t)
        self.nbytes += int(g.ggml_nbytes(t.ptr))
        return t

    def _repackable(self, ne, qtype: int) -> bool:
        return (
            self.repack
            and ne[3] == 1
            and (ne[2] > 1 or ne[1] > 1)
            and ne[1] % 8 == 0
            and self.device.repacks(qtype)
        )

    def write(self, t: T, data: np.ndarray) -> None:
        """All of ``t``'s bytes from ``data`` (after ``finalize``): a
        repacked tensor is laid out as it is written."""
        g = self.device.g
        if data.nbytes != g.ggml_nbytes(t.ptr) or not data.flags.c_contiguous:
            raise GGMLError(
                f"write: {data.nbytes} contiguous bytes for a tensor of "
                f"{g.ggml_nbytes(t.ptr)}"
            )
        g.ggml_backend_tensor_set(t.ptr, data.ctypes.data, 0, data.nbytes)

    def finalize(self) -> None:
        """Repack (CPU) or upload (other devices) what ``add`` deferred, and
        allocate ``add_device``'s tensors."""
        g = self.device.g
        if self._repacks or self._repack_filled:
            self._repack_buffer = g.ggml_backend_alloc_ctx_tensors_from_buft(
                self._repack_ctx.ctx, self.device.repack_buft
            )
            if not self._repack_buffer:
                raise GGMLError("could not allocate ggml's CPU_REPACK buffer")
            for t in [t for t, *_ in self._repacks] + self._repack_filled:
                if not TensorMirror.from_address(t.ptr).extra:
                    # Device.repacks said it would: a ggml change.
                    raise GGMLError(f"ggml did not repack a type-{t.qtype} tensor")
            for t in self._repack_filled:
                self.repacked_bytes += int(g.ggml_nbytes(t.ptr))
            while self._repacks:
                t, data, release = self._repacks.pop(0)  # drop each as copied
                g.ggml_backend_tensor_set(t.ptr, data.ctypes.data, 0, data.nbytes)
                self.repacked_bytes += data.nbytes
                if release:
                    release_pages(data)
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
