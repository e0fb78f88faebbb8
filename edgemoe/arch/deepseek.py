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

from dataclasses import dataclass
from typing import Any

from edgemoe.arch import register
from edgemoe.arch.base import (
    Family,
    HFConfig,
    LatentPart,
    ModelSpec,
    TensorMap,
    eos_tuple,
)
from edgemoe.arch.mixtral import ATTN_MAP
from edgemoe.arch.yarn_config import rope_fields, yarn_mscale
from edgemoe.errors import ConfigError

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
        grouped = v3 or c.topk_method == "group_limited_greedy"
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
