"""Calibration: run the float model over a text, one layer at a time, and
record what quantization needs.

Per layer and expert: how often and how strongly it is routed to (hotness,
shipped to the runtime's scheduler), the mean squared input of each column of
its gate/up projections (importance weights for the quantizer, an
"imatrix"), and the peak magnitude of its output (super-expert detection).

The down projection gets no such weights: its inputs (SwiGLU activations) are
heavy-tailed, and weighting by them made the fixture's level-2 perplexity
worse (+1.60% vs +1.43% unweighted), while weighting gate/up helped (+1.39%).
Activations move through the float model layer by layer, so only one layer's
weights are ever in memory.
Legend: W windows, T tokens per window, D hidden, E experts, F expert FFN.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.arch.base import ModelSpec
from edgemoe.attention import Attention, KVCache, RoPE, latent_attention, rms_norm
from edgemoe.errors import ModelFileError
from edgemoe.routing import route

# Standard-library modules whose docstrings and code make the default
# calibration text: every Python install has them, so conversion needs no
# download. Prose and code, like the mixed input most chat models see.
DEFAULT_SOURCES = (
    "textwrap.py",
    "argparse.py",
    "string.py",
    "shlex.py",
    "dataclasses.py",
    "json/encoder.py",
    "json/decoder.py",
    "calendar.py",
    "fractions.py",
)


def default_text() -> str:
    stdlib = Path(os.__file__).parent
    parts = []
    for name in DEFAULT_SOURCES:
        p = stdlib / name
        if p.exists():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(path, "calibration file not found") from None
    except UnicodeDecodeError:
        raise ModelFileError(path, "calibration file is not UTF-8 text") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror}") from None


TRACE_TOKENS = 256
"""Tokens per layer whose routing the manifest keeps."""
TRACE_CHUNKS = 4


def trace_rows(n: int) -> np.ndarray:
    """Rows of the trace: TRACE_CHUNKS runs of consecutive tokens spread over
    the calibration text (one run from its start would be a file header)."""
    run = TRACE_TOKENS // TRACE_CHUNKS
    if n <= TRACE_TOKENS:
        return np.arange(n)
    starts = np.linspace(0, n - run, TRACE_CHUNKS).astype(np.int64)
    return (starts[:, None] + np.arange(run)).reshape(-1)


@dataclass
class ExpertStats:
    """What calibration saw of one MoE layer's experts."""

    count: np.ndarray  # [E] tokens routed to each expert
    weight: np.ndarray  # [E] summed routing weight
    in_sq: np.ndarray  # [E, D] summed squared gate/up input per column
    peak: np.ndarray  # [E] largest |output| of the expert
    tokens: int
    trace_ids: np.ndarray | None = None
    """[S, K] experts that sampled tokens (runs of consecutive ones) picked,
    and their ``trace_weights``: a cost model replays them to see how often
    each dual-routing setting lifts an expert and how a cache fares."""
    trace_weights: np.ndarray | None = None
    trace_next: np.ndarray | None = None
    """[S, K] for the same tokens: the next MoE layer's router applied to this
    layer's input, the guess the runtime prefetches by (HOBBIT's predictor),
    so a cost model can replay its reads too."""

    def trace(self) -> dict:
        """The manifest's record of the trace (``calibration.routing``)."""
        out = {
            "ids": self.trace_ids.tolist(),
            "weights": np.round(self.trace_weights, 4).tolist(),
        }
        if self.trace_next is not None:
            out["next"] = self.trace_next.tolist()
        return out

    def imatrix(self, e: int, prior: float = 8.0) -> np.ndarray:
        """Mean squared gate/up input per column for expert ``e``, shrunk
        towards the layer's mean so rarely routed experts get sane weights."""
        layer = self.in_sq.sum(axis=0) / max(self.count.sum(), 1)
        return ((self.in_sq[e] + prior * layer) / (self.count[e] + prior)).astype(
            np.float32
        )

    def super_experts(self, ratio: float = 10.0, limit: int = 2) -> list[int]:
        """Experts whose output peaks stand ``ratio`` x above the layer's median."""
        seen = self.peak[self.count > 0]
        if seen.size < 3:
            return []
        median = float(np.median(seen))
        order = np.argsort(-self.peak)[:limit]
        return sorted(int(e) for e in order if self.peak[e] > ratio * median > 0)


class LayerRunner:
    """The float forward pass of one layer over all calibration windows."""

    def __init__(self, spec: ModelSpec, window: int):
        self.spec = spec
        self.rope = RoPE(spec, window)
        one = dataclasses.replace(
            spec,
            n_layer=1,
            moe_layers=(True,),
            swa_layers=(),  # each layer's window is passed in
            n_expert=max(spec.n_expert, 1),
            n_expert_used=max(spec.n_expert_used, 1),
            expert_ffn=max(spec.expert_ffn, 1),
        )
        self.cache = KVCache(one, window)
        self.attn = Attention(one, self.rope, self.cache)

    def attention(
        self, x: np.ndarray, w: dict[str, np.ndarray], layer: int = 0
    ) -> np.ndarray:
        """x + attention(x) for every window; ``x`` [W, T, D]."""
        s = self.spec
        window = s.sliding_window if not s.swa_layers or s.swa_layers[layer] else None
        out = np.empty_like(x)
        for i, xw in enumerate(x):
            xn = rms_norm(xw, w["attn_norm"], s.rms_eps)
            if s.attention == "mla":
                out[i] = xw + latent_attention(s, self.rope, w, xn) @ w["attn_output"].T
                continue
            q, k, v = (xn @ w[n].T for n in ("attn_q", "attn_k", "attn_v"))
            if "attn_q.bias" in w:
                q, k, v = (
                    q + w["attn_q.bias"],
                    k + w["attn_k.bias"],
                    v + w["attn_v.bias"],
                )
            a = np.empty((xw.shape[0], s.n_head * s.head_dim), dtype=np.float32)
            self.attn(
                0, q, k, v, 0, a, w.get("attn_q_norm"), w.get("attn_k_norm"),
                window, w.get("attn_sinks"),
            )  # fmt: skip
            o = a @ w["attn_output"].T
            if "attn_output.bias" in w:
                o = o + w["attn_output.bias"]
            out[i] = xw + o
        return out

    def moe(
        self,
        hn: np.ndarray,
        router: np.ndarray,
        expert: Callable,
        router_bias: np.ndarray | None = None,
        bias: Callable | None = None,
        select: np.ndarray | None = None,
    ) -> tuple[np.ndarray, ExpertStats]:
        """Sum of routed experts for tokens ``hn`` [N, D], and the statistics.

        ``expert(e)`` gives expert e's float (gate [F, D], up [F, D], down [D, F]),
        ``bias(e)`` its biases (gate [F], up [F], down [D]) where it has them;
        ``select`` [E]: DeepSeek-V3's correction bias, for choosing only.
        """
        s = self.spec
        n, d = hn.shape
        logits = hn @ router.T  # [N, E]
        if router_bias is not None:
            logits = logits + router_bias
        ids, weights = route(s, logits, select)  # [N, K]
        e_count = s.n_expert
        traced = trace_rows(n)
        stats = ExpertStats(
            count=np.zeros(e_count),
            weight=np.zeros(e_count),
            in_sq=np.zeros((e_count, d)),
            peak=np.zeros(e_count),
            tokens=n,
            trace_ids=ids[traced],
            trace_weights=weights[traced],
        )
        out = np.zeros_like(hn)
        for e in range(e_count):
            rows, slot = np.nonzero(ids == e)
            stats.count[e] = rows.size
            if rows.size == 0:
                continue
            x = hn[rows]  # [n_e, D]
            y = expert_ffn(s, x, *expert(e), bias(e) if bias else None)  # [n_e, D]
            w = weights[rows, slot]
            stats.weight[e] = float(w.sum())
            stats.in_sq[e] = np.square(x).sum(axis=0)
            stats.peak[e] = float(np.abs(y).max())
            np.add.at(out, rows, y * w[:, None])
        return out, stats


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def expert_ffn(spec: ModelSpec, x, gate, up, down, bias=None) -> np.ndarray:
    """One expert on rows ``x`` [N, D]: SwiGLU, or gpt-oss's clamped form
    with its biases (``bias`` = (gate [F], up [F], down [D]))."""
    bg, bu, bd = bias if bias is not None else (0.0, 0.0, 0.0)
    a, b = x @ gate.T + bg, x @ up.T + bu  # [N, F]
    if spec.ffn_act == "swiglu_oai":
        lim = spec.swiglu_limit
        a, b = np.minimum(a, lim), np.clip(b, -lim, lim)
        act = a / (1.0 + np.exp(-spec.swiglu_alpha * a)) * (b + 1.0)
    else:
        act = silu(a) * b
    return act @ down.T + bd


def dense_mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray):
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T
