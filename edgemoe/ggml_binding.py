"""ctypes binding to the ggml libraries inside the installed llama-cpp-python.

Only ``ggml_init_params`` is mirrored to call ggml; ``struct ggml_tensor`` is
mirrored read-only, for the self-test. Everything a ggml assertion would check
is checked in Python first (runtime/graph.py): an assertion aborts the process.
The first ``lib()`` call loads the libraries and runs a self-test (type sizes,
the struct mirror, a Q8_0 matvec against numpy) and refuses a mismatching ggml.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int64, c_size_t
from pathlib import Path

import numpy as np

from edgemoe.env import prepare_environment
from edgemoe.errors import GGMLError

P = ctypes.c_void_p

# ggml.h enum ggml_type (the ones we name) and enum ggml_backend_dev_type.
F32, F16, Q4_0, Q4_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, I32, BF16 = (
    0,
    1,
    2,
    3,
    8,
    10,
    11,
    12,
    13,
    14,
    26,
    30,
)
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2
TENSOR_ALIGNMENT = 32  # ggml-impl.h; cpu_buffer_from_ptr asserts it


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", P), ("no_alloc", c_bool)]


class TensorMirror(ctypes.Structure):
    """``struct ggml_tensor`` of ggml 0.25 (GGML_MAX_DIMS 4, MAX_SRC 10,
    MAX_OP_PARAMS 64, MAX_NAME 64); verified by the self-test, read-only."""

    _fields_ = [
        ("type", c_int),
        ("buffer", P),
        ("ne", c_int64 * 4),
        ("nb", c_size_t * 4),
        ("op", c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", P * 10),
        ("view_src", P),
        ("view_offs", c_size_t),
        ("data", P),
        ("name", ctypes.c_char * 64),
        ("extra", P),
        ("padding", ctypes.c_char * 8),
    ]


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [
        ("type_name", c_char_p),
        ("blck_size", c_int64),
        ("blck_size_interleave", c_int64),
        ("type_size", c_size_t),
        ("is_quantized", c_bool),
        ("to_float", P),
        ("from_float_ref", P),
    ]


_SIGNATURES: list[tuple[str, object, list]] = [
    ("ggml_init", P, [InitParams]),
    ("ggml_log_set", None, [P, P]),
    ("ggml_free", None, [P]),
    ("ggml_tensor_overhead", c_size_t, []),
    ("ggml_graph_overhead_custom", c_size_t, [c_size_t, c_bool]),
    ("ggml_new_tensor_1d", P, [P, c_int, c_int64]),
    ("ggml_new_tensor_2d", P, [P, c_int, c_int64, c_int64]),
    ("ggml_new_tensor_3d", P, [P, c_int, c_int64, c_int64, c_int64]),
    ("ggml_set_name", P, [P, c_char_p]),
    ("ggml_set_input", None, [P]),
    ("ggml_set_output", None, [P]),
    ("ggml_type_size", c_size_t, [c_int]),
    ("ggml_blck_size", c_int64, [c_int]),
    ("ggml_row_size", c_size_t, [c_int, c_int64]),
    ("ggml_nbytes", c_size_t, [P]),
    ("ggml_type_name", c_char_p, [c_int]),
    ("ggml_mul_mat", P, [P, P, P]),
    ("ggml_mul_mat_id", P, [P, P, P, P]),
    ("ggml_add", P, [P, P, P]),
    ("ggml_mul", P, [P, P, P]),
    ("ggml_scale", P, [P, P, c_float]),
    ("ggml_rms_norm", P, [P, P, c_float]),
    ("ggml_swiglu_split", P, [P, P, P]),
    ("ggml_swiglu_oai", P, [P, P, P, c_float, c_float]),
    ("ggml_add_id", P, [P, P, P, P]),
    ("ggml_sigmoid", P, [P, P]),
    ("ggml_reshape_2d", P, [P, P, c_int64, c_int64]),
    ("ggml_reshape_3d", P, [P, P, c_int64, c_int64, c_int64]),
    ("ggml_reshape_4d", P, [P, P, c_int64, c_int64, c_int64, c_int64]),
    ("ggml_view_2d", P, [P, P, c_int64, c_int64, c_size_t, c_size_t]),
    (
        "ggml_view_3d",
        P,
        [P, P, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t],
    ),
    ("ggml_acc", P, [P, P, P, c_size_t, c_size_t, c_size_t, c_size_t]),
    ("ggml_get_rows", P, [P, P, P]),
    ("ggml_set_rows", P, [P, P, P, P]),
    (
        "ggml_rope_ext",
        P,
        [P, P, P, P, c_int, c_int, c_int] + [c_float] * 6,
    ),
    ("ggml_soft_max_ext", P, [P, P, P, c_float, c_float]),
    ("ggml_flash_attn_ext", P, [P, P, P, P, P, c_float, c_float, c_float]),
    ("ggml_flash_attn_ext_add_sinks", None, [P, P]),
    ("ggml_argsort_top_k", P, [P, P, c_int]),
    ("ggml_permute", P, [P, P, c_int, c_int, c_int, c_int]),
    ("ggml_cont", P, [P, P]),
    ("ggml_sum_rows", P, [P, P]),
    ("ggml_clamp", P, [P, P, c_float, c_float]),
    ("ggml_pad", P, [P, P, c_int, c_int, c_int, c_int]),
    ("ggml_concat", P, [P, P, P, c_int]),
    ("ggml_div", P, [P, P, P]),
    ("ggml_new_graph_custom", P, [P, c_size_t, c_bool]),
    ("ggml_build_forward_expand", None, [P, P]),
    ("ggml_graph_n_nodes", c_int, [P]),
    ("ggml_quantize_chunk", c_size_t, [c_int, P, P, c_int64, c_int64, c_int64, P]),
    ("ggml_quantize_requires_imatrix", c_bool, [c_int]),
    ("ggml_backend_cpu_buffer_from_ptr", P, [P, c_size_t]),
    ("ggml_backend_buffer_free", None, [P]),
    ("ggml_backend_buffer_clear", None, [P, ctypes.c_uint8]),
    ("ggml_backend_buffer_is_host", c_bool, [P]),
    ("ggml_backend_buffer_get_alloc_size", c_size_t, [P, P]),
    ("ggml_backend_tensor_alloc", c_int, [P, P, P]),
    ("ggml_backend_view_init", c_int, [P]),
    ("ggml_backend_tensor_set", None, [P, P, c_size_t, c_size_t]),
    ("ggml_backend_tensor_get", None, [P, P, c_size_t, c_size_t]),
    ("ggml_backend_graph_compute", c_int, [P, P]),
    ("ggml_backend_free", None, [P]),
    ("ggml_backend_alloc_ctx_tensors", P, [P, P]),
    ("ggml_backend_alloc_ctx_tensors_from_buft", P, [P, P]),
    ("ggml_backend_buft_name", c_char_p, [P]),
    ("ggml_backend_buffer_get_type", P, [P]),
    ("ggml_backend_get_default_buffer_type", P, [P]),
    ("ggml_gallocr_new", P, [P]),
    ("ggml_gallocr_free", None, [P]),
    ("ggml_gallocr_reserve", c_bool, [P, P]),
    ("ggml_gallocr_alloc_graph", c_bool, [P, P]),
    ("ggml_gallocr_get_buffer_size", c_size_t, [P, c_int]),
    ("ggml_backend_dev_count", c_size_t, []),
    ("ggml_backend_dev_get", P, [c_size_t]),
    ("ggml_backend_dev_name", c_char_p, [P]),
    ("ggml_backend_dev_description", c_char_p, [P]),
    ("ggml_backend_dev_type", c_int, [P]),
    ("ggml_backend_dev_memory", None, [P, POINTER(c_size_t), POINTER(c_size_t)]),
    ("ggml_backend_dev_init", P, [P, c_char_p]),
    ("ggml_backend_dev_backend_reg", P, [P]),
    ("ggml_backend_reg_get_proc_address", P, [P, c_char_p]),
    ("ggml_backend_load_all_from_path", None, [c_char_p]),
    ("ggml_get_type_traits", POINTER(_TypeTraits), [c_int]),
]

SetNThreads = ctypes.CFUNCTYPE(None, P, c_int)
ToFloat = ctypes.CFUNCTYPE(None, P, P, c_int64)


LogCallback = ctypes.CFUNCTYPE(None, c_int, c_char_p, P)
_LOG_WARN, _LOG_CONT = 3, 5
_last_level = [0]


def _log_warnings(level: int, text: bytes, _user) -> None:
    if level == _LOG_CONT:
        level = _last_level[0]
    _last_level[0] = level
    if level >= _LOG_WARN and text:
        import sys

        sys.stderr.write(text.decode("utf-8", "replace"))


class GGMLLib:
    """The loaded libraries with typed functions as attributes."""

    def __init__(self, lib_dir: Path):
        self.lib_dir = lib_dir
        self._libs = []
        for stem in ("libggml-base", "libggml", "libggml-cpu"):
            path = lib_dir / f"{stem}.so"
            if not path.exists():
                path = next(iter(sorted(lib_dir.glob(f"{stem}.*"))), path)
            if path.exists():
                self._libs.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        if not self._libs:
            raise GGMLError(f"no ggml libraries in {lib_dir}")
        missing = []
        for name, restype, argtypes in _SIGNATURES:
            fn = self._find(name)
            if fn is None:
                missing.append(name)
                continue
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        if missing:
            raise GGMLError(
                f"ggml in {lib_dir} lacks {', '.join(missing)}; EdgeMoE needs the "
                "ggml of llama-cpp-python >=0.3.36,<0.4"
            )
        self.version = _lib_version(lib_dir)
        # ggml prints every message, debug ones included ("repack: repack
        # tensor ...") to stderr unless told otherwise: keep warnings and
        # errors only. The callback object must outlive the library's use.
        self._log = LogCallback(_log_warnings)
        self.ggml_log_set(ctypes.cast(self._log, P), None)

    def _find(self, name: str):
        for lib in self._libs:
            try:
                return getattr(lib, name)
            except AttributeError:
                continue
        return None

    def devices(self) -> list[tuple[int, str, str, int]]:
        """Registered devices as (handle, name, description, type)."""
        if self.ggml_backend_dev_count() == 0:
            # Builds with GGML_BACKEND_DL register nothing until loaded by path.
            self.ggml_backend_load_all_from_path(str(self.lib_dir).encode())
        out = []
        for i in range(self.ggml_backend_dev_count()):
            dev = self.ggml_backend_dev_get(i)
            out.append(
                (
                    dev,
                    self.ggml_backend_dev_name(dev).decode(),
                    self.ggml_backend_dev_description(dev).decode(),
                    self.ggml_backend_dev_type(dev),
                )
            )
        return out

    def repack_buffer_type(self, dev: int):
        """The CPU device's "CPU_REPACK" extra buffer type (weights laid out
        for its interleaved matmul kernels, as llama.cpp uses by default),
        or None where this ggml has none."""
        reg = self.ggml_backend_dev_backend_reg(dev)
        addr = self.ggml_backend_reg_get_proc_address(
            reg, b"ggml_backend_dev_get_extra_bufts"
        )
        if not addr:
            return None
        bufts = ctypes.CFUNCTYPE(POINTER(P), P)(addr)(dev)
        i = 0
        while bufts and bufts[i]:
            if self.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
                return bufts[i]
            i += 1
        return None

    def to_float_fn(self, qtype: int):
        """ggml's own row dequantizer of ``qtype`` (``fn(src, dst, n)``: n
        values from whole blocks), or None where ggml has none or its traits
        do not read as this binding lays them out (callers then dequantize
        in numpy)."""
        traits = self.ggml_get_type_traits(qtype)
        if not traits:
            return None
        t = traits.contents
        if (
            t.type_name != self.ggml_type_name(qtype)
            or t.blck_size != self.ggml_blck_size(qtype)
            or t.type_size != self.ggml_type_size(qtype)
            or not t.to_float
        ):
            return None
        return ToFloat(t.to_float)

    def set_n_threads_fn(self, dev: int):
        """The device's ``set_n_threads`` entry from its registry, or None."""
        reg = self.ggml_backend_dev_backend_reg(dev)
        addr = self.ggml_backend_reg_get_proc_address(
            reg, b"ggml_backend_set_n_threads"
        )
        return SetNThreads(addr) if addr else None


def _lib_version(lib_dir: Path) -> str:
    for p in sorted(lib_dir.glob("libggml-base.so.*")):
        if p.name.count(".") >= 4:
            return p.name.split(".so.", 1)[1]
    return "unknown"


def find_lib_dir() -> Path:
    """llama-cpp-python's ``lib/`` folder, located without importing llama_cpp."""
    env = os.environ.get("EDGEMOE_GGML_LIB_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise GGMLError(
            "llama-cpp-python is not installed; EdgeMoE computes through its ggml "
            "(pip install 'llama-cpp-python>=0.3.36,<0.4')"
        )
    return Path(spec.origin).parent / "lib"


_LOCK = threading.Lock()
_LIB: GGMLLib | None = None


def lib() -> GGMLLib:
    """The ggml libraries, loaded and self-tested on first call."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            prepare_environment()
            loaded = GGMLLib(find_lib_dir())
            self_test(loaded)
            _LIB = loaded
        return _LIB


_ROW_TO_FLOAT: dict[int, object] = {}


def row_to_float(qtype: int):
    """ggml's row dequantizer of ``qtype`` (``fn(src, dst, n)``, cached), or
    None where ggml does not load or has none: callers compute the same in
    numpy then."""
    if qtype not in _ROW_TO_FLOAT:
        try:
            _ROW_TO_FLOAT[qtype] = lib().to_float_fn(qtype)
        except (GGMLError, OSError):
            _ROW_TO_FLOAT[qtype] = None
    return _ROW_TO_FLOAT[qtype]


def self_test(g: GGMLLib) -> None:
    """Refuse a ggml whose types, struct layout or matmul differ from ours."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for t in (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K):
        blk, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        if (g.ggml_blck_size(t), g.ggml_type_size(t)) != (blk, size):
            raise GGMLError(
                f"ggml type {t} is ({g.ggml_blck_size(t)}, {g.ggml_type_size(t)}) "
                f"(block, bytes) in {g.lib_dir}, expected ({blk}, {size}): "
                "unsupported ggml version"
            )
    ctx = g.ggml_init(InitParams(g.ggml_tensor_overhead() * 8 + 4096, None, True))
    if not ctx:
        raise GGMLError("ggml_init failed during the self-test")
    try:
        _self_test_matvec(g, ctx)
    finally:
        g.ggml_free(ctx)


def _self_test_matvec(g: GGMLLib, ctx: int) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    k, n = 64, 4
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    wq = quantize(w, GGMLQuantizationType.Q8_0)
    slab = np.zeros(4096, dtype=np.uint8)
    base = slab.ctypes.data + (-slab.ctypes.data % 64)
    off_w, off_x, off_y = 0, 512, 1024  # w is 4 rows x 68 bytes
    ctypes.memmove(base + off_w, wq.ctypes.data, wq.nbytes)
    ctypes.memmove(base + off_x, x.ctypes.data, x.nbytes)

    tw = g.ggml_new_tensor_2d(ctx, Q8_0, k, n)
    tx = g.ggml_new_tensor_2d(ctx, F32, k, 1)
    m = TensorMirror.from_address(tw)
    if tuple(m.ne) != (k, n, 1, 1) or tuple(m.nb) != (34, 68, 68 * n, 68 * n):
        raise GGMLError(
            f"struct ggml_tensor layout differs (ne={tuple(m.ne)}, nb={tuple(m.nb)}): "
            "unsupported ggml version"
        )
    buf = g.ggml_backend_cpu_buffer_from_ptr(base, 3000)
    try:
        for t, off in ((tw, off_w), (tx, off_x)):
            if g.ggml_backend_tensor_alloc(buf, t, base + off) != 0:
                raise GGMLError("ggml_backend_tensor_alloc failed in the self-test")
        if TensorMirror.from_address(tw).data != base + off_w:
            raise GGMLError("struct ggml_tensor data offset differs: unsupported ggml")
        ty = g.ggml_mul_mat(ctx, tw, tx)
        g.ggml_backend_tensor_alloc(buf, ty, base + off_y)
        graph = g.ggml_new_graph_custom(ctx, 8, False)
        g.ggml_build_forward_expand(graph, ty)
        backend = g.ggml_backend_dev_init(_cpu_device(g), None)
        try:
            if g.ggml_backend_graph_compute(backend, graph) != 0:
                raise GGMLError("ggml graph compute failed in the self-test")
        finally:
            g.ggml_backend_free(backend)
        y = np.frombuffer((ctypes.c_float * n).from_address(base + off_y), np.float32)
        xq = dequantize(
            quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
        )
        ref = dequantize(wq, GGMLQuantizationType.Q8_0) @ xq[0]
        if not np.allclose(y, ref, rtol=1e-4, atol=1e-4):
            raise GGMLError(
                f"ggml Q8_0 matvec self-test mismatch: {y} vs numpy {ref}; "
                "unsupported ggml build"
            )
    finally:
        g.ggml_backend_buffer_free(buf)


def _cpu_device(g: GGMLLib) -> int:
    for dev, _, _, kind in g.devices():
        if kind == DEV_CPU:
            return dev
    raise GGMLError("ggml has no CPU device registered")
