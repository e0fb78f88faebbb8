"""Write a llama.cpp-loadable GGUF (llama.cpp's names, metadata and vocab).

Used to hand our models to llama.cpp (interop, and the reference in tests and
benchmarks). Tensors are streamed: one is in memory at a time. The file is
written under a temporary name and renamed at the end, so a failed export
never leaves a half-written file under the requested name; a lock on the name
keeps a second export of it from racing the first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.arch.base import GGUFMeta, ModelSpec
from edgemoe.checkpoint.base import GGML_F16, GGML_F32, Weight
from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.format.lock import OutputLock

# Types we export (quantized by ggml itself), by the names llama.cpp's tools use.
EXPORT_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q2_K": 10,
    "Q4_K": 12,
    "Q6_K": 14,
}
MIXES = {
    # llama.cpp's Q4_K_M, simplified: Q4_K, with the output head and the
    # value projections (whose errors it finds costliest) at Q6_K.
    "Q4_K_M": (12, {"output.weight": 14, "attn_v.weight": 14}),
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# Fields a GGUF round trip must preserve for llama.cpp to compute the same model.
_MATH_FIELDS = (
    "n_vocab",
    "n_embd",
    "n_layer",
    "n_head",
    "n_head_kv",
    "head_dim",
    "rms_eps",
    "rope_theta",
    "qk_norm",
    "clip_qkv",
    "sliding_window",
    "n_expert",
    "n_expert_used",
    "expert_ffn",
    "norm_topk_prob",
    "shared_expert_ffn",
    "shared_expert_gated",
    "moe_layers",
    "swa_layers",
    "attn_bias",
    "attn_sinks",
    "rope_scaling",
    "rope_factor",
    "rope_orig_ctx",
    "rope_beta_fast",
    "rope_beta_slow",
    "rope_attn_factor",
    "rope_truncate",
    "router",
    "moe_bias",
    "ffn_act",
    "swiglu_alpha",
    "swiglu_limit",
    "attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_dim",
    "v_head_dim",
    "attn_scale",
    "n_group",
    "topk_group",
    "routed_scale",
)


def target_type(name: str, qtype: str) -> int:
    """The block type ``qtype`` (a type or a mix) asks of tensor ``name``."""
    if qtype in MIXES:
        base, special = MIXES[qtype]
        # "output.weight" is the head, not blk.N.attn_output.weight.
        hit = (t for n, t in special.items() if name == n or name.endswith("." + n))
        return next(hit, base)
    return EXPORT_TYPES[qtype]


def tensor_type(name: str, shape: tuple[int, ...], target: int) -> int:
    """llama.cpp's policy: vectors and routers stay F32; rows that do not split
    into the target's blocks fall back to F16."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", ".bias")):
        return GGML_F32
    block = GGML_QUANT_SIZES[GGMLQuantizationType(target)][0]
    return target if shape[-1] % block == 0 else GGML_F16


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate halves) -> llama.cpp ``llama`` (rotate pairs) Q/K row order."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def encode_tensor(w: Weight, qtype: int, spec: ModelSpec, permute: bool) -> np.ndarray:
    """The bytes (or float array) to store for ``w`` at ggml type ``qtype``."""
    if w.qtype == qtype and not permute:
        return w.data
    x = w.to_float32()
    if permute:
        heads = spec.n_head if ".attn_q." in w.name else spec.n_head_kv
        x = permute_rows(x, heads)
    return quantize_rows(x, qtype)


def quantize_rows(x: np.ndarray, qtype: int) -> np.ndarray:
    """Float rows ``x`` [..., K] in ggml type ``qtype`` (an EXPORT_TYPES
    value), quantized by ggml itself as llama-quantize does without an
    importance matrix: its reference rounding (the same bytes; on the
    fixture's Q4_K_M backbone the same KL divergence from float as ggml's
    search with uniform weights, at half the time)."""
    if qtype == GGML_F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == GGML_F16:
        return x.astype(np.float16)
    from edgemoe.quant.ggml_quant import quantize

    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    return quantize(rows, qtype, fit=False).reshape(*x.shape[:-1], -1)


def hf_vocab_fields(root: Path, n_vocab: int) -> dict[str, Any]:
    """``tokenizer.ggml.*`` for a byte-level BPE ``tokenizer.json`` (GPT-2 style)."""
    from tokenizers import Tokenizer

    from edgemoe.checkpoint.hf import read_json

    path = root / "tokenizer.json"
    data = read_json(path)
    model = data.get("model", {})
    pre = data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ConfigError(
            f"{path}: GGUF export supports byte-level BPE tokenizers; this one is "
            f"{model.get('type')} with pre-tokenizer {pre.get('type')}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    types = {}
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        types[tok["id"]] = TOKEN_CONTROL if tok.get("special") else TOKEN_USER_DEFINED
    size = max(n_vocab, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    token_types = [TOKEN_UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        token_types[i] = types.get(i, TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = (
        read_json(root / "tokenizer_config.json")
        if (root / "tokenizer_config.json").exists()
        else {}
    )
    tok = Tokenizer.from_file(str(path))

    def special_id(key: str) -> int | None:
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return tok.token_to_id(v) if isinstance(v, str) else None

    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": merges,
    }
    bos, eos = special_id("bos_token"), special_id("eos_token")
    if bos is not None:
        fields["tokenizer.ggml.bos_token_id"] = bos
        fields["tokenizer.ggml.add_bos_token"] = tok.encode("a").ids[:1] == [bos]
    if eos is not None:
        fields["tokenizer.ggml.eos_token_id"] = eos
    template = cfg.get("chat_template")
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = template
    return fields


def _check_roundtrip(
    family, spec: ModelSpec, arch: str, fields: dict[str, Any]
) -> None:
    """Refuse models llama.cpp's graph for ``arch`` would compute differently."""
    why = family.llamacpp_refusal(spec)
    if why:
        raise ConfigError(f"llama.cpp's {arch!r} cannot represent this model: {why}")
    meta = {f"{arch}.{k}": v for k, v in fields.items()}
    back = family.spec_from_gguf(GGUFMeta(arch, meta, "export"))
    diff = [f for f in _MATH_FIELDS if not _same(getattr(back, f), getattr(spec, f))]
    if diff:
        raise ConfigError(
            f"llama.cpp's {arch!r} cannot represent this model: "
            + ", ".join(
                f"{f}={getattr(spec, f)!r} (llama.cpp: {getattr(back, f)!r})"
                for f in diff
            )
        )


def _same(a: Any, b: Any) -> bool:
    """Equal, floats to float32's precision (scales llama.cpp recomputes from
    the stored ones, such as DeepSeek's softmax scale)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def write_gguf(
    ckpt,
    out: str | Path,
    qtype: str = "F16",
    *,
    vocab: dict[str, Any] | None = None,
    name: str | None = None,
    force: bool = False,
    check_llamacpp: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    lock: bool = True,
) -> Path:
    """Write ``ckpt`` as a GGUF llama.cpp loads.

    Args:
        ckpt: an HF or GGUF checkpoint (anything with ``spec``, ``family``,
            ``names()``, ``load()``).
        out: output file; refused if it exists unless ``force``.
        qtype: weight type for matrices (``EXPORT_TYPES``) or a mix (``MIXES``).
        vocab: ``tokenizer.*`` fields; by default taken from the checkpoint.
        check_llamacpp: refuse models llama.cpp would compute differently (off
            for an EdgeMoE backbone, which only EdgeMoE computes).
        progress: called as ``progress(tensor_name, index, total)``.
        lock: hold ``OutputLock(out)`` while writing; off only for a file in a
            folder no other process writes (``convert``'s partial directory).
    """
    import gguf

    if qtype not in EXPORT_TYPES and qtype not in MIXES:
        raise ConfigError(
            f"GGUF type {qtype!r} not supported; use one of "
            f"{sorted(EXPORT_TYPES) + sorted(MIXES)}"
        )
    out = Path(out)
    check_output_file(out, force)
    spec, family = ckpt.spec, ckpt.family
    if not family.gguf_architectures:
        raise ConfigError(
            f"{ckpt.path}: writing {family.name} as GGUF is not supported yet"
        )
    arch = family.gguf_architectures[0]
    fields = family.gguf_fields(spec)
    if check_llamacpp:
        _check_roundtrip(family, spec, arch, fields)
    if vocab is None:
        vocab = _checkpoint_vocab(ckpt)
    permute = family.gguf_rope_interleaved and not spec.rope_interleaved
    names = ckpt.names()
    tmp = out.with_name(f".{out.name}.partial")
    guard = _lock_output(out, force) if lock else None
    writer = gguf.GGUFWriter(tmp, arch)  # opens nothing yet
    try:
        writer.add_name(name or Path(ckpt.path).name)
        writer.add_file_type(_file_type(qtype))
        for key, value in fields.items():
            _add_field(writer, f"{arch}.{key}", value)
        for key, value in vocab.items():
            _add_field(writer, key, value)
        plan = []
        for n in names:
            w_shape = _shape_of(ckpt, n)
            kept = getattr(ckpt, "stored_type", lambda name: None)(n)
            t = (
                kept
                if kept is not None
                else tensor_type(n, w_shape, target_type(n, qtype))
            )
            plan.append((n, t, w_shape))
            nbytes = _nbytes(t, w_shape)
            byte_shape = w_shape if t == GGML_F32 else _byte_shape(t, w_shape)
            dtype = (
                np.float32
                if t == GGML_F32
                else (np.float16 if t == GGML_F16 else np.uint8)
            )
            writer.add_tensor_info(
                family.to_gguf_name(n),
                byte_shape,
                np.dtype(dtype),
                nbytes,
                raw_dtype=gguf.GGMLQuantizationType(t),
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (n, t, _) in enumerate(plan):
            if progress:
                progress(n, i, len(plan))
            w = ckpt.load(n)
            is_qk = permute and (".attn_q." in n or ".attn_k." in n) and "norm" not in n
            writer.write_tensor_data(encode_tensor(w, t, spec, is_qk))
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, permissions: not a bug of ours
            raise ModelFileError(out, f"cannot write: {e.strerror or e}") from None
        raise
    finally:
        if guard is not None:
            guard.release()
    return out


def _lock_output(out: Path, force: bool) -> OutputLock:
    """The lock on ``out`` (see edgemoe.format.lock), with ``out`` checked again
    under it and what a killed export left removed."""
    guard = OutputLock(out)
    try:
        check_output_file(out, force)
        guard.remove_stale()
    except BaseException:
        guard.release()
        raise
    return guard


def check_output_file(out: Path, force: bool) -> None:
    """Refuse an output path before any work: an existing file unless ``force``
    (it stays untouched either way until the new one is complete), a directory,
    or a folder that does not exist."""
    if out.is_dir():
        raise ModelFileError(out, "is a directory; give a file name for the GGUF")
    if out.exists() and not force:
        raise ModelFileError(out, "already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise ModelFileError(out.parent, "no such directory for the output file")


def _shape_of(ckpt, name: str) -> tuple[int, ...]:
    from edgemoe.checkpoint.base import tensor_layout

    return tensor_layout(ckpt.spec)[name][0]


def _nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size


def _byte_shape(qtype: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if qtype == GGML_F16:
        return shape
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return (*shape[:-1], shape[-1] // block * size)


def _file_type(qtype: str) -> int:
    import gguf

    # general.file_type is informational; Q4_K files are the "S" mix here.
    name = {"F32": "ALL_F32", "Q4_K": "MOSTLY_Q4_K_S"}.get(qtype, f"MOSTLY_{qtype}")
    return int(getattr(gguf.LlamaFileType, name))


def _add_field(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise ConfigError(
            f"cannot write GGUF metadata {key!r} of type {type(value).__name__}"
        )


def _checkpoint_vocab(ckpt) -> dict[str, Any]:
    fields = getattr(ckpt, "tokenizer_fields", None)
    if fields is not None:
        return dict(fields())
    root = getattr(ckpt, "root", None)
    if root is None:
        raise ConfigError("no vocabulary to write: pass vocab=")
    return hf_vocab_fields(Path(root), ckpt.spec.n_vocab)
