"""Qwen2-MoE / Qwen1.5-MoE (``Qwen2MoeForCausalLM``; GGUF ``qwen2moe``).

Biased q/k/v projections; a shared expert added to every token, scaled by
sigmoid(x . w_gate_shared); top-k weights renormalised only with ``norm_topk_prob``.
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
from edgemoe.arch.qwen3_moe import QWEN_MOE_MAP, sparse_layers

TENSOR_MAP = TensorMap(
    {
        **QWEN_MOE_MAP,
        "model.layers.{bid}.mlp.shared_expert.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",
        "model.layers.{bid}.mlp.shared_expert.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
        "model.layers.{bid}.mlp.shared_expert.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
        "model.layers.{bid}.mlp.shared_expert_gate.weight": "blk.{bid}.ffn_gate_inp_shexp.weight",
    }
)


@dataclass
class ArchConfig(HFConfig):
    aliases = {"num_local_experts": "num_experts"}

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    num_experts: int = 60
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: Any = None


@register
class Qwen2Moe(Family):
    name = "qwen2_moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_architectures = ("qwen2moe",)
    tensor_map = TENSOR_MAP

    @classmethod
    def gguf_fields(cls, spec: ModelSpec) -> dict[str, int | float]:
        return {
            **common_gguf_fields(spec),
            "expert_feed_forward_length": spec.expert_ffn,
            "expert_shared_feed_forward_length": spec.shared_expert_ffn,
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
            # transformers writes sliding_window 0 for "no window".
            sliding_window=(c.sliding_window or None) if c.use_sliding_window else None,
            n_expert=c.num_experts,
            n_expert_used=c.num_experts_per_tok,
            expert_ffn=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            shared_expert_ffn=c.shared_expert_intermediate_size,
            shared_expert_gated=True,
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
        # llama.cpp's qwen2moe graph never renormalises the top-k weights.
        return meta.make_spec(
            **common,
            expert_ffn=meta.get_int("expert_feed_forward_length", "ffn"),
            norm_topk_prob=False,
            shared_expert_ffn=meta.get_int(
                "expert_shared_feed_forward_length", "shared_expert_ffn", 0
            ),
            shared_expert_gated=True,
            moe_layers=(True,) * common["n_layer"],
        )
