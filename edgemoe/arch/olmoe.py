"""OLMoE (``OlmoeForCausalLM``; GGUF ``olmoe``).

RMSNorm over the whole q and k projections (not per head) before RoPE, optional
clamping of q/k/v to ``clip_qkv``; softmax top-k routing without renormalisation
by default.
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
from edgemoe.arch.qwen3_moe import QK_NORM_MAP, QWEN_MOE_MAP

TENSOR_MAP = TensorMap({**QWEN_MOE_MAP, **QK_NORM_MAP})


@dataclass
class ArchConfig(HFConfig):
    aliases = {"num_local_experts": "num_experts"}

    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    clip_qkv: float | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: Any = 50279


@register
class Olmoe(Family):
    name = "olmoe"
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_architectures = ("olmoe",)
    tensor_map = TENSOR_MAP

    @classmethod
    def gguf_fields(cls, spec: ModelSpec) -> dict[str, int | float]:
        return {**common_gguf_fields(spec), "feed_forward_length": spec.expert_ffn}

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
            qk_norm="full",
            clip_qkv=c.clip_qkv,
            n_expert=c.num_experts,
            n_expert_used=c.num_experts_per_tok,
            expert_ffn=c.intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            moe_layers=(True,) * c.num_hidden_layers,
            tie_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_ids=eos_tuple(c.eos_token_id),
        )

    @classmethod
    def spec_from_gguf(cls, meta: GGUFMeta) -> ModelSpec:
        common = meta.common_spec(cls.name)
        # llama.cpp's olmoe graph never renormalises the top-k weights.
        return meta.make_spec(
            **common,
            qk_norm="full",
            expert_ffn=meta.get_int("feed_forward_length", "ffn"),
            norm_topk_prob=False,
            moe_layers=(True,) * common["n_layer"],
        )
