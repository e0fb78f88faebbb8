"""gpt-oss (``GptOssForCausalLM``; GGUF ``gpt-oss``).

Windowed and full attention layers alternate (``layer_types``), each head
has a learned attention sink, q/k/v/o carry biases, RoPE is YaRN-scaled
(unrounded correction range). The router has a bias and takes the softmax
over its top-k logits; every expert projection has a bias, and the experts'
SwiGLU is clamped (``swiglu_limit``) with σ(1.702·gate). The checkpoint
stores each expert's gate and up as one ``x @ W`` matrix, columns
interleaved, and down transposed: cut into llama.cpp's layout on read.
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
    Part,
    TensorMap,
    common_gguf_fields,
    eos_tuple,
)
from edgemoe.arch.mixtral import ATTN_MAP
from edgemoe.arch.yarn_config import gguf_yarn, rope_fields, yarn_gguf_fields
from edgemoe.errors import ConfigError

_L = "model.layers.{bid}."
_B = "blk.{bid}."

TENSOR_MAP = TensorMap(
    {
        **ATTN_MAP,
        _L + "self_attn.sinks": _B + "attn_sinks.weight",
        _L + "mlp.router.weight": _B + "ffn_gate_inp.weight",
        _L + "mlp.router.bias": _B + "ffn_gate_inp.bias",
        _L + "mlp.experts.gate_up_proj": (
            Part(_B + "ffn_gate_exps.weight", transpose=True, first=0, step=2),
            Part(_B + "ffn_up_exps.weight", transpose=True, first=1, step=2),
        ),
        _L + "mlp.experts.gate_up_proj_bias": (
            Part(_B + "ffn_gate_exps.bias", first=0, step=2),
            Part(_B + "ffn_up_exps.bias", first=1, step=2),
        ),
        _L + "mlp.experts.down_proj": (
            Part(_B + "ffn_down_exps.weight", transpose=True),
        ),
        _L + "mlp.experts.down_proj_bias": _B + "ffn_down_exps.bias",
        # The published checkpoints: MXFP4 experts, rows already [E, N, K].
        **{
            _L + f"mlp.experts.gate_up_proj_{kind}": (
                Part(_B + "ffn_gate_exps.weight", first=0, step=2, mxfp4=kind),
                Part(_B + "ffn_up_exps.weight", first=1, step=2, mxfp4=kind),
            )
            for kind in ("blocks", "scales")
        },
        **{
            _L + f"mlp.experts.down_proj_{kind}": (
                Part(_B + "ffn_down_exps.weight", mxfp4=kind),
            )
            for kind in ("blocks", "scales")
        },
    }
)

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class ArchConfig(HFConfig):
    aliases = {"num_experts": "num_local_experts"}

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    head_dim: int | None = 64
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: Any = None


@register
class GptOss(Family):
    name = "gpt_oss"
    hf_architectures = ("GptOssForCausalLM",)
    gguf_architectures = ("gpt-oss",)
    gguf_renames = {"ffn_norm.weight": "post_attention_norm.weight"}
    tensor_map = TENSOR_MAP

    @classmethod
    def spec_from_hf(cls, config: dict[str, Any]) -> ModelSpec:
        c = ArchConfig.from_dict(config)
        n = c.num_hidden_layers
        types = c.layer_types
        if types is None:  # transformers' default: windowed first, then alternating
            types = [LAYER_TYPES[i % 2] for i in range(n)]
        if len(types) != n or any(t not in LAYER_TYPES for t in types):
            raise ConfigError(
                f"config.json: layer_types must list {n} of "
                f"{' / '.join(LAYER_TYPES)}, got {types!r}"
            )
        swa = tuple(t == "sliding_attention" for t in types)
        rope = rope_fields(config, "gpt-oss", 150000.0)
        rope.pop("yarn", None)  # mscale and the like: DeepSeek's, not gpt-oss's
        return ModelSpec(
            family=cls.name,
            n_vocab=c.vocab_size,
            n_embd=c.hidden_size,
            n_layer=n,
            n_head=c.num_attention_heads,
            n_head_kv=c.num_key_value_heads or c.num_attention_heads,
            head_dim=c.head_dim or c.hidden_size // c.num_attention_heads,
            n_ctx_train=c.max_position_embeddings,
            rms_eps=c.rms_norm_eps,
            **rope,
            sliding_window=c.sliding_window if any(swa) else None,
            swa_layers=swa if any(swa) else (),
            attn_bias=c.attention_bias,
            attn_sinks=True,
            router="topk_softmax",
            n_expert=c.num_local_experts,
            n_expert_used=c.num_experts_per_tok,
            expert_ffn=c.intermediate_size,
            moe_bias=True,
            ffn_act="swiglu_oai",
            swiglu_alpha=c.swiglu_alpha,
            swiglu_limit=c.swiglu_limit,
            moe_layers=(True,) * n,
            tie_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_ids=eos_tuple(c.eos_token_id),
        )

    @classmethod
    def spec_from_gguf(cls, meta: GGUFMeta) -> ModelSpec:
        common = meta.common_spec(cls.name)
        n = common["n_layer"]
        window = meta.get_int("attention.sliding_window", "sliding_window")
        # llama.cpp: a bool per layer, else every other layer windowed from 0.
        pattern = meta.get("attention.sliding_window_pattern", None)
        if pattern is None:
            swa = tuple(i % 2 == 0 for i in range(n))
        elif (
            isinstance(pattern, list)
            and len(pattern) == n
            and all(type(b).__name__ in ("bool", "bool_") for b in pattern)
        ):
            swa = tuple(bool(b) for b in pattern)
        else:
            raise ConfigError(
                f"{meta.source}: {meta.arch}.attention.sliding_window_pattern must "
                f"list true/false for each of {n} layers"
            )
        rope = gguf_yarn(meta)
        if rope:
            # Ours: llama.cpp always rounds YaRN's range (see gguf_fields).
            truncate = meta.get("rope.scaling.yarn_truncate", True) is not False
            rope["rope_truncate"] = truncate
        return meta.make_spec(
            **common,
            **rope,
            sliding_window=window,
            swa_layers=swa,
            attn_bias=True,  # llama.cpp's gpt-oss graph requires them
            attn_sinks=True,
            router="topk_softmax",
            expert_ffn=meta.get_int("expert_feed_forward_length", "ffn"),
            moe_bias=True,
            # llama.cpp's graph fixes the clamped SwiGLU's constants.
            ffn_act="swiglu_oai",
            swiglu_alpha=1.702,
            swiglu_limit=7.0,
            moe_layers=(True,) * n,
        )

    @classmethod
    def gguf_fields(cls, spec: ModelSpec) -> dict[str, Any]:
        fields: dict[str, Any] = {
            **common_gguf_fields(spec),
            "expert_feed_forward_length": spec.expert_ffn,
            "feed_forward_length": spec.expert_ffn,
            "attention.sliding_window": spec.sliding_window or spec.n_ctx_train,
            "attention.sliding_window_pattern": list(
                spec.swa_layers or (False,) * spec.n_layer
            ),
        }
        if spec.rope_scaling == "yarn":
            fields.update(yarn_gguf_fields(spec))
            if not spec.rope_truncate:
                # llama.cpp ignores this key and rounds YaRN's range, as it
                # does for the published gpt-oss; EdgeMoE reads it back.
                fields["rope.scaling.yarn_truncate"] = False
        return fields
