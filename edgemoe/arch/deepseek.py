"""DeepSeek-V2 and -V3 (``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``;
GGUF ``deepseek2``), and the models built on them (Moonlight, Kimi ...).

MLA attention: a low-rank query (or a full one, V2-Lite), one joint
projection to a normed latent and a shared RoPE key, expanded per head to
keys and values; the cache holds the latent and the RoPE key. RoPE rotates
pairs, on the RoPE part only, YaRN-scaled with DeepSeek's mscale. Routing:
V2 a softmax (greedy, or limited to the best groups by their best expert),
V3 a sigmoid chosen with a correction bias (groups scored by their two best);
weights times ``routed_scaling_factor``. Shared experts are one ungated MLP;
the first ``first_k_dense_replace`` layers are dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemoe.arch import register
from edgemoe.arch.base import (
    Family,
    GGUFMeta,
    HFConfig,
    LatentPart,
    ModelSpec,
    TensorMap,
    common_gguf_fields,
    eos_tuple,
)
from edgemoe.arch.mixtral import ATTN_MAP
from edgemoe.arch.yarn_config import (
    gguf_yarn,
    rope_fields,
    yarn_gguf_fields,
    yarn_mscale,
)
from edgemoe.errors import ConfigError
from edgemoe.rope import attn_factor

GATING = {1: "softmax_topk", 2: "sigmoid_topk"}
"""llama.cpp's ``expert_gating_func`` values this family's graph takes."""

_L = "model.layers.{bid}."
_B = "blk.{bid}."

TENSOR_MAP = TensorMap(
    {
        **ATTN_MAP,  # norms, embeddings, head; q_proj and o_proj as elsewhere
        _L + "self_attn.q_a_proj.weight": _B + "attn_q_a.weight",
        _L + "self_attn.q_a_layernorm.weight": _B + "attn_q_a_norm.weight",
        _L + "self_attn.q_b_proj.weight": _B + "attn_q_b.weight",
        _L + "self_attn.kv_a_proj_with_mqa.weight": _B + "attn_kv_a_mqa.weight",
        _L + "self_attn.kv_a_layernorm.weight": _B + "attn_kv_a_norm.weight",
        _L + "self_attn.kv_b_proj.weight": (
            LatentPart(_B + "attn_k_b.weight", first=0),
            LatentPart(_B + "attn_v_b.weight", first=1),
        ),
        _L + "mlp.gate.weight": _B + "ffn_gate_inp.weight",
        _L + "mlp.gate.e_score_correction_bias": _B + "exp_probs_b.bias",
        _L + "mlp.experts.{xid}.gate_proj.weight": _B + "ffn_gate_exps.weight",
        _L + "mlp.experts.{xid}.up_proj.weight": _B + "ffn_up_exps.weight",
        _L + "mlp.experts.{xid}.down_proj.weight": _B + "ffn_down_exps.weight",
        _L + "mlp.shared_experts.gate_proj.weight": _B + "ffn_gate_shexp.weight",
        _L + "mlp.shared_experts.up_proj.weight": _B + "ffn_up_shexp.weight",
        _L + "mlp.shared_experts.down_proj.weight": _B + "ffn_down_shexp.weight",
        _L + "mlp.gate_proj.weight": _B + "ffn_gate.weight",
        _L + "mlp.up_proj.weight": _B + "ffn_up.weight",
        _L + "mlp.down_proj.weight": _B + "ffn_down.weight",
    }
)


@dataclass
class ArchConfig(HFConfig):
    aliases = {"num_experts": "n_routed_experts"}

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: Any = None


def _rope(config: dict[str, Any], qk_head_dim: int) -> dict[str, Any]:
    """RoPE fields, YaRN's attention factor from DeepSeek's mscale, and the
    softmax scale its ``mscale_all_dim`` changes: transformers scales cos and
    sin by mscale(f, mscale) / mscale(f, all) and the softmax by mscale(f,
    all)^2 (modeling_rope_utils, yarn_apply_mscale)."""
    out = rope_fields(config, "DeepSeek", 10000.0)
    extras = out.pop("yarn", None)
    if extras is None:
        return out
    f, m, m_all = out["rope_factor"], extras.get("mscale"), extras.get("mscale_all_dim")
    if out["rope_attn_factor"] is None:
        out["rope_attn_factor"] = (
            yarn_mscale(f, m) / yarn_mscale(f, m_all) if m and m_all else yarn_mscale(f)
        )
    out["attn_scale"] = qk_head_dim**-0.5 * (
        yarn_mscale(f, m_all) ** 2 if m_all else 1.0
    )
    return out


@register
class DeepSeek(Family):
    name = "deepseek"
    hf_architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    gguf_architectures = ("deepseek2",)
    tensor_map = TENSOR_MAP

    @classmethod
    def spec_from_hf(cls, config: dict[str, Any]) -> ModelSpec:
        c = ArchConfig.from_dict(config)
        v3 = config.get("architectures", [""])[0] == "DeepseekV3ForCausalLM"
        n = c.num_hidden_layers
        if not v3 and c.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"config.json: topk_method {c.topk_method!r} (greedy or "
                "group_limited_greedy)"
            )
        # Keeping every group is no limit: stored as none, as llama.cpp must.
        grouped = (v3 or c.topk_method == "group_limited_greedy") and (
            (c.topk_group or 0) < (c.n_group or 0)
        )
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        return ModelSpec(
            family=cls.name,
            n_vocab=c.vocab_size,
            n_embd=c.hidden_size,
            n_layer=n,
            n_head=c.num_attention_heads,
            n_head_kv=c.num_attention_heads,
            head_dim=c.qk_rope_head_dim,
            n_ctx_train=c.max_position_embeddings,
            rms_eps=c.rms_norm_eps,
            **_rope(config, qk),
            rope_interleaved=c.rope_interleave if v3 else True,
            attention="mla",
            q_lora_rank=c.q_lora_rank or 0,
            kv_lora_rank=c.kv_lora_rank,
            qk_nope_dim=c.qk_nope_head_dim,
            v_head_dim=c.v_head_dim,
            router="sigmoid_topk" if v3 else "softmax_topk",
            # V2's router never renormalises (transformers drops the flag).
            norm_topk_prob=c.norm_topk_prob if v3 else False,
            n_group=(c.n_group or 0) if grouped else 0,
            topk_group=(c.topk_group or 0) if grouped else 0,
            routed_scale=c.routed_scaling_factor,
            n_expert=c.n_routed_experts,
            n_expert_used=c.num_experts_per_tok,
            expert_ffn=c.moe_intermediate_size,
            shared_expert_ffn=c.moe_intermediate_size * c.n_shared_experts,
            dense_ffn=c.intermediate_size,
            moe_layers=tuple(i >= c.first_k_dense_replace for i in range(n)),
            tie_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_ids=eos_tuple(c.eos_token_id),
        )

    @classmethod
    def spec_from_gguf(cls, meta: GGUFMeta) -> ModelSpec:
        rope_dim = meta.get_int("rope.dimension_count", "head_dim")
        common = meta.common_spec(cls.name, head_dim=rope_dim)
        # llama.cpp's absorbed form has one latent "head" of keys and values;
        # the model's own keys and values have a head per query head.
        n = common["n_layer"]
        common["n_head_kv"] = common["n_head"]
        lora = meta.get_int("attention.kv_lora_rank", "kv_lora_rank")
        k_mla = meta.get_int("attention.key_length_mla", "head_dim")
        if k_mla <= rope_dim:
            raise ConfigError(
                f"{meta.source}: {meta.arch}.attention.key_length_mla {k_mla} must "
                f"exceed rope.dimension_count {rope_dim} (the RoPE part of a key)"
            )
        for key, want in (("key_length", lora + rope_dim), ("value_length", lora)):
            got = meta.get(f"attention.{key}", want)
            if got != want:
                raise ConfigError(
                    f"{meta.source}: {meta.arch}.attention.{key} is {got!r}, "
                    f"expected {want} (kv_lora_rank {lora}, RoPE {rope_dim})"
                )
        gating = meta.get("expert_gating_func", 1)  # absent: V2's softmax
        if gating not in GATING or isinstance(gating, bool):
            raise ConfigError(
                f"{meta.source}: {meta.arch}.expert_gating_func {gating!r} "
                "(1 softmax or 2 sigmoid)"
            )
        dense = meta.get_int("leading_dense_block_count", "layer_index", 0)
        ffn = meta.get_int("expert_feed_forward_length", "ffn")
        shared = meta.get_int("expert_shared_count", "n_expert")
        norm = meta.get("expert_weights_norm", False)
        if not isinstance(norm, (bool, np.bool_)):
            raise ConfigError(
                f"{meta.source}: {meta.arch}.expert_weights_norm must be true or "
                f"false, got {norm!r}"
            )
        return meta.make_spec(
            **common,
            **_gguf_rope(meta, k_mla),
            rope_interleaved=True,  # llama.cpp rotates pairs (LLAMA_ROPE_TYPE_NORM)
            attention="mla",
            q_lora_rank=meta.get_int("attention.q_lora_rank", "q_lora_rank", 0),
            kv_lora_rank=lora,
            qk_nope_dim=k_mla - rope_dim,
            v_head_dim=meta.get_int("attention.value_length_mla", "v_head_dim"),
            router=GATING[gating],
            norm_topk_prob=bool(norm),
            n_group=meta.get_int("expert_group_count", "n_group", 0),
            topk_group=meta.get_int("expert_group_used_count", "topk_group", 0),
            routed_scale=meta.get_float("expert_weights_scale", "routed_scale", 1.0),
            expert_ffn=ffn,
            shared_expert_ffn=ffn * shared,
            dense_ffn=meta.get_int("feed_forward_length", "dense_ffn", 0),
            moe_layers=tuple(i >= dense for i in range(n)),
        )

    @classmethod
    def llamacpp_refusal(cls, spec: ModelSpec) -> str | None:
        shared, ffn = spec.shared_expert_ffn, spec.expert_ffn
        if any(spec.moe_layers) and (not shared or shared % ffn):
            return (
                "its MoE layers always add whole shared experts; shared FFN "
                f"{shared}, expert FFN {ffn}"
            )
        if spec.n_group > 1 and spec.router == "softmax_topk":
            return (
                "it scores an expert group by its two best experts; "
                "DeepSeek-V2's group-limited routing by its best one"
            )
        if spec.q_lora_rank and spec.n_layer in (26, 27):
            return (
                "it reads 26 or 27 layers as V2-Lite, without the low-rank "
                "query this model has"
            )
        if not spec.rope_interleaved:
            return "it rotates RoPE pairs; this model rotates halves"
        if spec.rope_scaling == "yarn" and spec.rope_factor <= 1:
            return f"its YaRN needs a factor above 1, got {spec.rope_factor}"
        return None

    @classmethod
    def gguf_fields(cls, spec: ModelSpec) -> dict[str, Any]:
        moe = sum(spec.moe_layers)
        dk = spec.qk_nope_dim + spec.head_dim
        fields: dict[str, Any] = {
            **common_gguf_fields(spec),
            "attention.head_count_kv": 1,
            "attention.key_length": spec.kv_lora_rank + spec.head_dim,
            "attention.value_length": spec.kv_lora_rank,
            "attention.key_length_mla": dk,
            "attention.value_length_mla": spec.v_head_dim,
            "attention.q_lora_rank": spec.q_lora_rank,
            "attention.kv_lora_rank": spec.kv_lora_rank,
            "leading_dense_block_count": spec.n_layer - moe,
            "feed_forward_length": spec.dense_ffn or spec.expert_ffn,
            "expert_feed_forward_length": spec.expert_ffn,
            "expert_shared_count": spec.shared_expert_ffn // max(spec.expert_ffn, 1),
            "expert_weights_scale": float(spec.routed_scale),
            "expert_weights_norm": bool(spec.norm_topk_prob),
            "expert_gating_func": next(
                k for k, v in GATING.items() if v == spec.router
            ),
        }
        if spec.n_group > 1:
            fields["expert_group_count"] = spec.n_group
            fields["expert_group_used_count"] = spec.topk_group
        if spec.rope_scaling == "yarn" and spec.rope_factor > 1:
            fields.update(_yarn_fields(spec, dk))
        return fields


# llama.cpp's YaRN for deepseek2 (llama-context.cpp, models/deepseek2.cpp):
# with ``rope.scaling.yarn_log_multiplier`` L' (stored as 0.1 L, its converter's
# convention) and ``rope.scaling.attn_factor`` A, cos and sin are scaled by A
# and the softmax by (A·m(L))² / sqrt(dk), where m(L) = 1 + 0.1·L·ln(factor);
# without L by A·m(1) and its square. Our spec holds the two scales directly
# (``rope_attn_factor`` R, ``attn_scale`` S); these map between them.


def _yarn_fields(spec: ModelSpec, dk: int) -> dict[str, Any]:
    f, r = spec.rope_factor, attn_factor(spec)
    s = spec.attn_scale or dk**-0.5
    log_f = math.log(f)
    m = math.sqrt(s * math.sqrt(dk)) / r  # m(L) the softmax asks for
    out = yarn_gguf_fields(spec)
    if abs(m - 1) < 1e-12:  # L = 0 cannot be stored: 0 means absent
        a = r / (1 + 0.1 * log_f)
    else:
        a = r
        out["rope.scaling.yarn_log_multiplier"] = (m - 1) / log_f
    if a != 1.0:
        out["rope.scaling.attn_factor"] = a
    return out


def _gguf_rope(meta: GGUFMeta, dk: int) -> dict[str, Any]:
    """``rope_*`` and ``attn_scale`` as llama.cpp computes them from the file."""
    a = meta.get_float("rope.scaling.attn_factor", "rope_attn_factor", 1.0)
    rope = gguf_yarn(meta)
    if not rope:
        if a != 1.0:
            raise ConfigError(
                f"{meta.source}: {meta.arch}.rope.scaling.attn_factor {a} "
                "without YaRN is not supported"
            )
        return {}
    f = rope["rope_factor"]
    if f <= 1:
        raise ConfigError(
            f"{meta.source}: {meta.arch}.rope.scaling.factor {f} (YaRN needs > 1)"
        )
    log_f = float(np.log(np.float32(f)))
    log_mul = meta.get("rope.scaling.yarn_log_multiplier", 0.0)
    ok = isinstance(log_mul, (int, float, np.floating)) and not isinstance(
        log_mul, bool
    )
    m = 1 + log_mul * log_f if ok and math.isfinite(log_mul) else 0.0
    if m <= 0:
        raise ConfigError(
            f"{meta.source}: {meta.arch}.rope.scaling.yarn_log_multiplier "
            f"{log_mul!r} (a number keeping 1 + L·ln(factor) above 0)"
        )
    if log_mul != 0:
        r, s = a, (a * m) ** 2 / math.sqrt(dk)
    else:
        r = a * (1 + 0.1 * log_f)
        s = r**2 / math.sqrt(dk)
    return {**rope, "rope_attn_factor": r, "attn_scale": s}
