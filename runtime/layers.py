"""One model's weights as ggml tensors, layer by layer, for the step graphs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.arch.base import ModelSpec
from edgemoe.checkpoint.base import GGML_F32, Weight, aligned_empty
from edgemoe.runtime.device import T, WeightSet


@dataclass(frozen=True)
class ExpertPlanes:
    """A layer's routed experts: plane p is (gate, up, down) over stacked
    ``[slots, N, K]`` tensors, with power-of-two shifts per projection; an
    expert at a level runs the planes up to it and sums them.

    A plain checkpoint is one plane of E slots (slot = expert id, straight
    from the in-graph top-k). A converted model with its planes resident
    (runtime/resident.py) has its own [E + 1] tensors per layer, slot E
    zero, and runs them in the graph, plane p on each token's ``counts[p]``
    heaviest experts and on protected ones; else ``host_routed`` and the
    host fills slot ids per plane each step (into the resident tensors, or
    into slot slabs streamed and shared across layers,
    runtime/expert_cache.py).
    """

    tensors: tuple[tuple[T, T, T], ...]
    shifts: tuple[tuple[int, int, int], ...]
    n_slots: tuple[int, ...]
    host_routed: bool = False
    counts: tuple[int, ...] = ()
    """Resident: experts per token (by weight rank) running each plane; ()
    runs plane 1 on all of them (a plain model)."""
    protected: tuple[int, ...] = ()
    """Resident: experts that run every plane whatever the level."""
    n_expert: int = 0
    """Experts of the layer; 0: one per slot (a plain checkpoint)."""

    @property
    def n_experts(self) -> int:
        return self.n_expert or self.n_slots[0]


@dataclass
class LatentAttention:
    """DeepSeek's MLA projections (ggml handles; norms as float32)."""

    wq: T | None  # [H * (nope + rope), D]: a full query, or
    wq_a: T | None  # [q_lora, D] then
    q_a_norm: T | None
    wq_b: T | None  # [H * (nope + rope), q_lora]
    wkv_a: T  # [kv_lora + rope, D]
    kv_a_norm: T
    wk_b: T  # [H, kv_lora, nope]: latent -> each head's key
    wv_b: T  # [H, v, kv_lora]: latent -> each head's value


@dataclass
class LayerWeights:
    """ggml handles of one layer's tensors (norms and biases as float32)."""

    attn_norm: T
    wq: T | None
    wk: T | None
    wv: T | None
    wo: T
    ffn_norm: T
    mla: LatentAttention | None = None
    bq: T | None = None
    bk: T | None = None
    bv: T | None = None
    bo: T | None = None
    q_norm: T | None = None
    k_norm: T | None = None
    sinks: T | None = None
    router: T | None = None
    router_bias: T | None = None
    select_bias: T | None = None
    """DeepSeek-V3's e_score_correction_bias: moves the choice, not the weights."""
    experts: ExpertPlanes | None = None
    expert_bias: tuple[T, T, T] | None = None
    """Per expert (gate [F, E], up [F, E], down [D, E]): added to each
    projection's sum over planes (gpt-oss)."""
    gate_shexp: T | None = None
    up_shexp: T | None = None
    down_shexp: T | None = None
    gate_inp_shexp: T | None = None
    gate: T | None = None
    up: T | None = None
    down: T | None = None


def to_f32(w: Weight) -> Weight:
    """A float32 copy of a small vector weight for numpy/ggml elementwise use."""
    if w.qtype == GGML_F32:
        return w
    out = aligned_empty(w.shape, np.float32)
    out[...] = w.to_float32()
    return Weight(w.name, GGML_F32, w.shape, out)


def build_layers(
    spec: ModelSpec, load, weights: WeightSet, base, experts=None
) -> list[LayerWeights]:
    """LayerWeights for every layer; ``load(name) -> Weight | None``;
    ``experts(layer) -> ExpertPlanes`` for models stored as planes."""
    layers = []

    def add(name: str, f32: bool = False) -> T | None:
        w = load(name)
        if w is None:
            return None
        if f32:
            w = to_f32(w)
        # Nothing reads a layer's weights on the host after load.
        return weights.add(w, base(w), release=True)

    def add_rows(name: str, n: int) -> T:
        """A per-expert bias [E, F] (or [E, D]) padded with zeros to [E, n]: a
        converted model stores its experts' FFN and hidden width padded to
        whole quant blocks, and padded rows stay zero with a zero bias."""
        w = to_f32(load(name))
        if w.shape[1] < n:
            out = aligned_empty((w.shape[0], n), np.float32)
            out.fill(0)
            out[:, : w.shape[1]] = w.data.reshape(w.shape)
            w = Weight(w.name, GGML_F32, out.shape, out)
        return weights.add(w, base(w), release=True)

    for i, moe in enumerate(spec.moe_layers):
        b = f"blk.{i}."
        lw = LayerWeights(
            attn_norm=add(b + "attn_norm.weight", True),
            wq=add(b + "attn_q.weight"),
            wk=add(b + "attn_k.weight"),
            wv=add(b + "attn_v.weight"),
            wo=add(b + "attn_output.weight"),
            ffn_norm=add(b + "ffn_norm.weight", True),
            bq=add(b + "attn_q.bias", True),
            bk=add(b + "attn_k.bias", True),
            bv=add(b + "attn_v.bias", True),
            bo=add(b + "attn_output.bias", True),
            q_norm=add(b + "attn_q_norm.weight", True),
            k_norm=add(b + "attn_k_norm.weight", True),
            sinks=add(b + "attn_sinks.weight", True),
        )
        if spec.attention == "mla":
            lw.mla = LatentAttention(
                wq=lw.wq,
                wq_a=add(b + "attn_q_a.weight"),
                q_a_norm=add(b + "attn_q_a_norm.weight", True),
                wq_b=add(b + "attn_q_b.weight"),
                wkv_a=add(b + "attn_kv_a_mqa.weight"),
                kv_a_norm=add(b + "attn_kv_a_norm.weight", True),
                wk_b=add(b + "attn_k_b.weight"),
                wv_b=add(b + "attn_v_b.weight"),
            )
        if moe:
            lw.router = add(b + "ffn_gate_inp.weight")
            lw.router_bias = add(b + "ffn_gate_inp.bias", True)
            lw.select_bias = add(b + "exp_probs_b.bias", True)
            if experts is not None:
                lw.experts = experts(i)
            else:
                stacked = tuple(
                    add(b + f"ffn_{p}_exps.weight") for p in ("gate", "up", "down")
                )
                lw.experts = ExpertPlanes((stacked,), ((0, 0, 0),), (spec.n_expert,))
            if spec.moe_bias:
                f = lw.experts.tensors[0][0].ne[1]  # stored FFN, padded to blocks
                lw.expert_bias = (
                    add_rows(b + "ffn_gate_exps.bias", f),
                    add_rows(b + "ffn_up_exps.bias", f),
                    add_rows(b + "ffn_down_exps.bias", lw.experts.tensors[0][2].ne[1]),
                )
            lw.gate_shexp = add(b + "ffn_gate_shexp.weight")
            lw.up_shexp = add(b + "ffn_up_shexp.weight")
            lw.down_shexp = add(b + "ffn_down_shexp.weight")
            lw.gate_inp_shexp = add(b + "ffn_gate_inp_shexp.weight", True)
        else:
            lw.gate = add(b + "ffn_gate.weight")
            lw.up = add(b + "ffn_up.weight")
            lw.down = add(b + "ffn_down.weight")
        layers.append(lw)
    return layers
