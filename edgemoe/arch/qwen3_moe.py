"""Qwen3-MoE (``Qwen3MoeForCausalLM``; GGUF ``qwen3moe``).

Per-head RMSNorm on q and k before RoPE; dense MLP on ``mlp_only_layers`` and on
layers off the ``decoder_sparse_step`` grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgemoe.arch import register
from edgemoe.arch.base import (
    Family,
    GGUFMeta,
    HFConfig,
    ModelSpec,
    TensorMap,
    common_gguf_fields,
    eos_tuple,
    rope_theta_of,
)
from edgemoe.arch.mixtral import ATTN_MAP

QWEN_MOE_MAP = {
    **ATTN_MAP,
    "model.layers.{bid}.mlp.gate.weight": "blk.{bid}.ffn_gate_inp.weight",
    "model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight": "blk.{bid}.ffn_gate_exps.weight",
    "model.layers.{bid}.mlp.experts.{xid}.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",
    "model.layers.{bid}.mlp.experts.{xid}.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
"""Names shared by Qwen2-MoE, Qwen3-MoE and OLMoE (``mlp.gate``, ``mlp.experts``)."""

QK_NORM_MAP = {
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
}

TENSOR_MAP = TensorMap({**QWEN_MOE_MAP, **QK_NORM_MAP})


def sparse_layers(n_layer: int, n_expert: int, step: int, dense: list[int]) -> tuple:
    """Which layers are MoE, by transformers' Qwen rule."""
    return tuple(
        i not in dense and n_expert > 0 and (i + 1) % step == 0 for i in range(n_layer)
    )


@dataclass
class ArchConfig(HFConfig):
    aliases = {"num_local_experts": "num_experts"}

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: Any = None


@register
class Qwen3Moe(Family):
    name = "qwen3_moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_architectures = ("qwen3moe",)
    tensor_map = TENSOR_MAP

    @classmethod
    def gguf_fields(cls, spec: ModelSpec) -> dict[str, int | float]:
        return {
            **common_gguf_fields(spec),
            "expert_feed_forward_length": spec.expert_ffn,
            "feed_forward_length": spec.dense_ffn,
        }

    @classmethod
    def spec_from_hf(cls, config: dict[str, Any]) -> ModelSpec:
        c = ArchConfig.from_dict(config)
        return ModelSpec(
            family=cls.name,
            n_vocab=c.vocab_size,
            n_embd=c.hidden_size,
            n_layer=c.num_hidden_layers,
            n_head=c.num_attention_heads,
            n_head_kv=c.num_key_value_heads or c.num_attention_heads,
            head_dim=c.head_dim or c.hidden_size // c.num_attention_heads,
            n_ctx_train=c.max_position_embeddings,
            rms_eps=c.rms_norm_eps,
            rope_theta=rope_theta_of(config, 10000.0),
            qk_norm="head",
            # transformers writes sliding_window 0 for "no window".
            sliding_window=(c.sliding_window or None) if c.use_sliding_window else None,
            n_expert=c.num_experts,
            n_expert_used=c.num_experts_per_tok,
            expert_ffn=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            dense_ffn=c.intermediate_size,
            moe_layers=sparse_layers(
                c.num_hidden_layers,
                c.num_experts,
                c.decoder_sparse_step,
                c.mlp_only_layers or [],
            ),
            tie_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_ids=eos_tuple(c.eos_token_id),
        )

    @classmethod
    def spec_from_gguf(cls, meta: GGUFMeta) -> ModelSpec:
        common = meta.common_spec(cls.name)
        # llama.cpp's qwen3moe graph always renormalises the top-k weights.
        return meta.make_spec(
            **common,
            qk_norm="head",
            expert_ffn=meta.get_int("expert_feed_forward_length", "ffn"),
            norm_topk_prob=True,
            moe_layers=(True,) * common["n_layer"],
        )
