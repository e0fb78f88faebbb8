"""Mixtral (``MixtralForCausalLM``; GGUF ``llama`` with experts).

Softmax router over all experts, top-k renormalised (softmax of the top-k
logits). llama.cpp's converter permutes Q/K rows for its pairwise RoPE, so a
GGUF ``llama`` model rotates interleaved pairs while the HF checkpoint rotates
halves; ``ModelSpec.rope_interleaved`` carries which.
"""

from __future__ import annotations

from dataclasses import dataclass
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

ATTN_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.bias": "blk.{bid}.attn_output.bias",
}
"""The Llama-style backbone names every family here shares."""

TENSOR_MAP = TensorMap(
    {
        **ATTN_MAP,
        "model.layers.{bid}.block_sparse_moe.gate.weight": "blk.{bid}.ffn_gate_inp.weight",
        "model.layers.{bid}.block_sparse_moe.experts.{xid}.w1.weight": (
            "blk.{bid}.ffn_gate_exps.weight"
        ),
        "model.layers.{bid}.block_sparse_moe.experts.{xid}.w3.weight": (
            "blk.{bid}.ffn_up_exps.weight"
        ),
        "model.layers.{bid}.block_sparse_moe.experts.{xid}.w2.weight": (
            "blk.{bid}.ffn_down_exps.weight"
        ),
    }
)


@dataclass
class ArchConfig(HFConfig):
    aliases = {"num_experts": "num_local_experts"}

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: Any = 2


@register
class Mixtral(Family):
    name = "mixtral"
    hf_architectures = ("MixtralForCausalLM",)
    gguf_architectures = ("llama",)
    gguf_rope_interleaved = True
    tensor_map = TENSOR_MAP

    @classmethod
    def gguf_fields(cls, spec: ModelSpec) -> dict[str, int | float]:
        ffn = spec.expert_ffn if any(spec.moe_layers) else spec.dense_ffn
        return {**common_gguf_fields(spec), "feed_forward_length": ffn}

    @classmethod
    def spec_from_hf(cls, config: dict[str, Any]) -> ModelSpec:
        c = ArchConfig.from_dict(config)
        n_kv = c.num_key_value_heads or c.num_attention_heads
        return ModelSpec(
            family=cls.name,
            n_vocab=c.vocab_size,
            n_embd=c.hidden_size,
            n_layer=c.num_hidden_layers,
            n_head=c.num_attention_heads,
            n_head_kv=n_kv,
            head_dim=c.head_dim or c.hidden_size // c.num_attention_heads,
            n_ctx_train=c.max_position_embeddings,
            rms_eps=c.rms_norm_eps,
            rope_theta=rope_theta_of(config, 1e6),
            sliding_window=c.sliding_window or None,  # transformers: 0 is off
            n_expert=c.num_local_experts,
            n_expert_used=c.num_experts_per_tok,
            expert_ffn=c.intermediate_size,
            norm_topk_prob=True,
            moe_layers=(True,) * c.num_hidden_layers,
            tie_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_ids=eos_tuple(c.eos_token_id),
        )

    @classmethod
    def spec_from_gguf(cls, meta: GGUFMeta) -> ModelSpec:
        common = meta.common_spec(cls.name)
        n_ff = meta.get_int("feed_forward_length", "ffn")
        moe = common["n_expert"] > 0
        return meta.make_spec(
            **common,
            rope_interleaved=True,
            expert_ffn=n_ff if moe else 0,
            dense_ffn=0 if moe else n_ff,
            norm_topk_prob=True,
            moe_layers=(moe,) * common["n_layer"],
        )
