"""``edgemoe convert``: a checkpoint -> an EdgeMoE model directory.

Streams layer by layer: calibration activations pass through layer i (float),
layer i's experts are measured, quantized into nested planes and written
(converters/expert_layer.py, one expert at a time), and only then is layer
i+1 read. Peak memory is the backbone's largest tensor in float32 and the
calibration activations, plus a few experts.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.checkpoint import open_checkpoint
from edgemoe.checkpoint.base import Weight, is_expert_matrix
from edgemoe.converters.calibration import (
    ExpertStats,
    LayerRunner,
    default_text,
    dense_mlp,
    read_text,
)
from edgemoe.converters.expert_layer import moe_layer, next_layer_guess
from edgemoe.converters.fit_workers import FitPool
from edgemoe.converters.padding import padded_width
from edgemoe.errors import ConfigError
from edgemoe.format.spec import Hotness, Manifest
from edgemoe.format.writer import ModelWriter
from edgemoe.quant.types import NestedQuant

Progress = Callable[[str, int, int], None]
MLA_WEIGHTS = (
    "attn_q_a",
    "attn_q_a_norm",
    "attn_q_b",
    "attn_kv_a_mqa",
    "attn_kv_a_norm",
    "attn_k_b",
    "attn_v_b",
)
"""DeepSeek's latent attention (edgemoe.attention.latent_attention)."""


@dataclass(frozen=True)
class ConvertOptions:
    levels: NestedQuant = field(default_factory=NestedQuant)
    backbone_type: str = "Q4_K_M"
    """ggml type of the backbone's matrices (routers and vectors stay F32)."""
    calib: str | None = None
    """Calibration text file; None uses the built-in text."""
    calib_tokens: int = 4096
    calib_window: int = 512
    super_ratio: float = 10.0
    """An expert whose output peak exceeds this x the layer median is protected."""
    max_shard_bytes: int = 2 << 30
    force: bool = False
    onnx_level: int | None = None
    """Also write ``model.onnx`` with experts at this level, inside the same
    atomic commit (and lock) as the rest of the model."""


@dataclass
class ConvertReport:
    manifest: Manifest
    out: Path
    seconds: float
    level_bytes: dict[int, int]
    backbone_bytes: int
    stats: list[ExpertStats | None] = field(default_factory=list)


class _Backbone:
    """The source checkpoint seen without its routed experts (for the GGUF writer)."""

    def __init__(self, ckpt):
        self._ckpt = ckpt
        self.spec, self.family, self.path = ckpt.spec, ckpt.family, ckpt.path
        self.root = getattr(ckpt, "root", None)
        if hasattr(ckpt, "tokenizer_fields"):
            self.tokenizer_fields = ckpt.tokenizer_fields

    def names(self) -> list[str]:
        return [n for n in self._ckpt.names() if not is_expert_matrix(n)]

    def load(self, name: str) -> Weight:
        return self._ckpt.load(name)


def _vocab(ckpt) -> tuple[dict[str, Any], str]:
    """GGUF vocabulary fields for the backbone, and which tokenizer to use."""
    if hasattr(ckpt, "tokenizer_fields"):
        return dict(ckpt.tokenizer_fields()), "gguf"
    # tokenizer.json travels with the model; a copy in backbone.gguf would
    # only cost memory when the backbone's metadata is read (~10 MB parsed
    # for a 4k vocabulary).
    return {}, "hf"


def convert(
    src: str | Path,
    out: str | Path,
    options: ConvertOptions | None = None,
    progress: Progress | None = None,
) -> ConvertReport:
    """Convert ``src`` (HF directory or GGUF) into an EdgeMoE model at ``out``."""
    opts = options or ConvertOptions()
    t0 = time.perf_counter()
    plan = opts.levels
    if opts.onnx_level is not None:
        plan.n_planes(opts.onnx_level)  # an unknown level fails before any work
    step = progress or (lambda stage, i, n: None)
    ckpt = open_checkpoint(src)
    try:
        spec = ckpt.spec
        if not any(spec.moe_layers):
            raise ConfigError(f"{src}: the model has no MoE layers to convert")
        f_pad = padded_width(spec.expert_ffn, plan)
        tokens, calib_source = _calibration_tokens(ckpt, opts)
        workers = max(1, min(os.cpu_count() or 1, 8))
        # The fitting processes start while the backbone is written.
        with ModelWriter(out, force=opts.force) as writer, FitPool(workers) as fits:
            return _convert(
                ckpt, writer, plan, f_pad, tokens, calib_source, opts, step, t0, fits
            )
    finally:
        ckpt.close()


def _calibration_tokens(ckpt, opts: ConvertOptions) -> tuple[np.ndarray, dict]:
    from edgemoe.checkpoint import tokenizer_for

    text = read_text(opts.calib) if opts.calib else default_text()
    tok = tokenizer_for(ckpt)
    try:
        ids = tok.encode(text, add_special=False)
    finally:
        close = getattr(tok, "close", None)
        if close:
            close()
    w = opts.calib_window
    n = min(len(ids) // w * w, max(opts.calib_tokens // w, 1) * w)
    if n < w:
        raise ConfigError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {w}"
        )
    source = {
        "file": str(opts.calib) if opts.calib else "builtin",
        "tokens": n,
        "window": w,
    }
    return np.asarray(ids[:n], dtype=np.int64).reshape(-1, w), source


def _convert(
    ckpt,
    writer: ModelWriter,
    plan: NestedQuant,
    f_pad: int,
    tokens: np.ndarray,
    calib_source: dict,
    opts: ConvertOptions,
    step: Progress,
    t0: float,
    fits: FitPool,
) -> ConvertReport:
    from edgemoe.converters.llama_gguf import write_gguf

    spec = ckpt.spec
    family = ckpt.family
    names = set(ckpt.names())
    vocab, tokenizer_kind = _vocab(ckpt)
    backbone = _Backbone(ckpt)
    writer.write_backbone(
        lambda path: write_gguf(
            backbone,
            path,
            opts.backbone_type,
            vocab=vocab,
            check_llamacpp=False,
            force=True,
            lock=False,  # inside the writer's partial directory, under its lock
            progress=lambda name, i, n: step("backbone", i, n),
        )
    )
    if tokenizer_kind == "hf":
        for fname in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            f = Path(ckpt.root) / fname
            if f.exists():
                writer.copy_file(f)
    moe_layers = [i for i, m in enumerate(spec.moe_layers) if m]
    d, ds = spec.n_embd, padded_width(spec.n_embd, plan)
    shapes = {"gate": (f_pad, ds), "up": (f_pad, ds), "down": (ds, f_pad)}
    writer.begin_experts(
        moe_layers, spec.n_expert, plan.planes, shapes, opts.max_shard_bytes
    )

    runner = LayerRunner(spec, opts.calib_window)
    embed = ckpt.load("token_embd.weight")
    x = embed.rows(tokens.reshape(-1)).reshape(*tokens.shape, d).astype(np.float32)
    del embed
    shifts, hotness, protected, all_stats = [], [], [], []
    for layer in range(spec.n_layer):
        step("layer", layer, spec.n_layer)
        b = f"blk.{layer}."

        def f32(name: str) -> np.ndarray | None:
            full = b + name + ("" if name.endswith(".bias") else ".weight")
            return ckpt.load(full).to_float32() if full in names else None

        attn_w = {
            n: f32(n)
            for n in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "attn_q_norm",
                "attn_k_norm",
                "attn_q.bias",
                "attn_k.bias",
                "attn_v.bias",
                "attn_output.bias",
                "attn_sinks",
                *MLA_WEIGHTS,
            )
        }
        attn_w = {k: v for k, v in attn_w.items() if v is not None}
        h = runner.attention(x, attn_w, layer)  # [W, T, D]
        del attn_w
        hn = rms_norm_rows(h, f32("ffn_norm"), spec.rms_eps).reshape(-1, d)
        if spec.moe_layers[layer]:
            ffn, stats, layer_shifts = moe_layer(
                ckpt, writer, layer, hn, runner, plan, f_pad, names, f32, step, fits
            )
            shifts.append(layer_shifts)
            total = max(stats.count.sum() / spec.n_expert_used, 1)
            hotness.append(
                tuple(
                    Hotness(
                        float(stats.count[e] / total),
                        float(stats.weight[e] / max(stats.count[e], 1)),
                    )
                    for e in range(spec.n_expert)
                )
            )
            protected.append(tuple(stats.super_experts(opts.super_ratio)))
            stats.trace_next = next_layer_guess(ckpt, layer, hn, names)
            all_stats.append(stats)
        else:
            ffn = dense_mlp(hn, f32("ffn_gate"), f32("ffn_up"), f32("ffn_down"))
            shifts.append(())
            hotness.append(())
            protected.append(())
            all_stats.append(None)
        x = h + ffn.reshape(h.shape)
    step("layer", spec.n_layer, spec.n_layer)
    manifest_spec = dataclasses.replace(
        spec, rope_interleaved=spec.rope_interleaved or family.gguf_rope_interleaved
    )
    source_format = "gguf" if hasattr(ckpt, "tokenizer_fields") else "hf"
    onnx = None
    if opts.onnx_level is not None:
        from edgemoe.converters.onnx_export import export_onnx

        def onnx(tmp: Path) -> None:
            export_onnx(tmp, opts.onnx_level)

    manifest = writer.finish(
        dict(
            architecture=ckpt.architecture,
            spec=manifest_spec,
            levels=plan.levels,
            expert_ffn=f_pad,
            expert_dim=ds if ds != d else 0,
            shifts=tuple(shifts),
            backbone_type=opts.backbone_type,
            hotness=tuple(hotness),
            protected=tuple(protected),
            calibration=dict(
                calib_source,
                routing=[st.trace() if st is not None else {} for st in all_stats],
            ),
            tokenizer=tokenizer_kind,
            chat_template=_chat_template(ckpt, vocab),
            source={"format": source_format, "path": str(ckpt.path)},
        ),
        before_commit=onnx,
    )
    from edgemoe.format.reader import EdgeCheckpoint

    done = EdgeCheckpoint(writer.out)
    try:
        level_bytes = done.level_bytes()
    finally:
        done.close()
    return ConvertReport(
        manifest,
        writer.out,
        time.perf_counter() - t0,
        level_bytes,
        manifest.backbone.bytes,
        all_stats,
    )


def rms_norm_rows(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    from edgemoe.attention import rms_norm

    return rms_norm(x, w, eps)


def _chat_template(ckpt, vocab: dict) -> str | None:
    template = vocab.get("tokenizer.chat_template")
    if template:
        return template
    root = getattr(ckpt, "root", None)
    if root is not None:
        from edgemoe.checkpoint.tokenizer import HFTokenizer

        try:
            return HFTokenizer(root).chat_template
        except Exception:
            return None
    return None
