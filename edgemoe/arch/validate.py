"""One set of rules for a model's shape and config numbers.

Every source (HF ``config.json``, GGUF metadata, a converted model's manifest,
``edgemoe synth``) goes through these checks before anything is allocated or
handed to ggml: a bad number there is a ggml abort (``GGML_ASSERT(eps >= 0.0f)``),
a ZeroDivisionError, or a tuple of 10**9 layers. Here it is one ``ConfigError``
naming the field, the value and what was expected.

The caps are far above any released model, and low enough that a per-layer or
per-expert table sized from them cannot exhaust memory before the tensors are
compared with what the files hold.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from typing import Any

from edgemoe.errors import ConfigError

MAX_LAYER = 1024
MAX_EMBD = 65536
MAX_VOCAB = 2**22
MAX_EXPERT = 4096
MAX_CTX = 2**24
MAX_HEAD = 4096
"""Head counts and the size of one head."""
MAX_FFN = 2**20
MAX_WINDOW = 2**31 - 1
"""A sliding window only masks positions; ggml and ONNX take it as an int32."""
MAX_EPS = 1.0
MAX_ROPE_THETA = 1e12
MAX_ROPE_FACTOR = 1e6
"""YaRN's context factor and its beta corrections."""
MAX_CLIP = 3.0e38
"""ggml takes the clamp as a float32; anything larger is infinity there."""
MAX_EOS = 1024
"""End-of-sequence ids are compared with every generated token."""

CAP = "EdgeMoE's cap"

INTS: dict[str, tuple[int, int]] = {
    "n_vocab": (1, MAX_VOCAB),
    "n_embd": (1, MAX_EMBD),
    "n_layer": (1, MAX_LAYER),
    "n_head": (1, MAX_HEAD),
    "n_head_kv": (1, MAX_HEAD),
    "head_dim": (1, MAX_HEAD),
    "n_ctx_train": (1, MAX_CTX),
    "n_expert": (0, MAX_EXPERT),
    "n_expert_used": (0, MAX_EXPERT),
    "expert_ffn": (0, MAX_FFN),
    "shared_expert_ffn": (0, MAX_FFN),
    "dense_ffn": (0, MAX_FFN),
    "sliding_window": (1, MAX_WINDOW),
    "rope_orig_ctx": (0, MAX_CTX),
    "q_lora_rank": (0, MAX_EMBD),
    "kv_lora_rank": (0, MAX_EMBD),
    "qk_nope_dim": (0, MAX_HEAD),
    "v_head_dim": (0, MAX_HEAD),
    "n_group": (0, MAX_EXPERT),
    "topk_group": (0, MAX_EXPERT),
    # Kinds used by the parsers, not ModelSpec fields:
    "experts": (1, MAX_EXPERT),
    "ffn": (1, MAX_FFN),
    "layer_index": (0, MAX_LAYER - 1),
    "layer_step": (1, MAX_LAYER),
    "token_id": (0, MAX_VOCAB - 1),
    "window_or_off": (0, MAX_WINDOW),
}
"""Inclusive ranges by ModelSpec field (or kind of value)."""
SPEC_INTS = (
    "n_vocab",
    "n_embd",
    "n_layer",
    "n_head",
    "n_head_kv",
    "head_dim",
    "n_ctx_train",
    "n_expert",
    "n_expert_used",
    "expert_ffn",
    "shared_expert_ffn",
    "dense_ffn",
    "rope_orig_ctx",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_dim",
    "v_head_dim",
    "n_group",
    "topk_group",
)
"""The int ModelSpec fields that are never None, checked in this order."""

FLOATS: dict[str, float] = {
    "rms_eps": MAX_EPS,
    "rope_theta": MAX_ROPE_THETA,
    "clip_qkv": MAX_CLIP,
    "rope_factor": MAX_ROPE_FACTOR,
    "rope_attn_factor": MAX_ROPE_FACTOR,
    "attn_scale": MAX_CLIP,
    "routed_scale": MAX_CLIP,
    "rope_beta_fast": MAX_ROPE_FACTOR,
    "rope_beta_slow": MAX_ROPE_FACTOR,
    "swiglu_alpha": MAX_CLIP,
    "swiglu_limit": MAX_CLIP,
}
"""Upper bounds; every float field must be finite and > 0."""

BOOLS = (
    "rope_interleaved",
    "attn_bias",
    "attn_sinks",
    "rope_truncate",
    "moe_bias",
    "norm_topk_prob",
    "shared_expert_gated",
    "tie_embeddings",
)
ATTENTION_KINDS = ("gqa", "mla")
ROUTER_KINDS = ("softmax_topk", "topk_softmax", "sigmoid_topk")
ROPE_SCALING_KINDS = (None, "yarn")
FFN_ACT_KINDS = ("swiglu", "swiglu_oai")
QK_NORM_KINDS = (None, "head", "full")

HF_KINDS: dict[str, str] = {
    "vocab_size": "n_vocab",
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_head_kv",
    "head_dim": "head_dim",
    "max_position_embeddings": "n_ctx_train",
    "intermediate_size": "ffn",
    "moe_intermediate_size": "ffn",
    "shared_expert_intermediate_size": "shared_expert_ffn",
    "num_local_experts": "experts",
    "num_experts": "experts",
    "num_experts_per_tok": "experts",
    "decoder_sparse_step": "layer_step",
    "mlp_only_layers": "layer_index",
    # transformers writes 0 for "no window" (Qwen2-MoE), so 0 is allowed here.
    "sliding_window": "window_or_off",
    "bos_token_id": "token_id",
    "eos_token_id": "token_id",
    "rms_norm_eps": "rms_eps",
    "clip_qkv": "clip_qkv",
}
"""config.json keys -> the range they are checked against."""

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 4
_repr.maxlevel = 2


def show(value: Any) -> str:
    """``repr`` short enough for a one-line error, even for a 4000-digit int."""
    if _is_int(value) and abs(int(value)).bit_length() > 64:
        digits = int(abs(int(value)).bit_length() * math.log10(2)) + 1
        sign = "-" if value < 0 else ""
        return f"{sign}an integer of about {digits} digits"
    try:
        return _repr.repr(value)
    except ValueError:  # an int past Python's str conversion limit, nested
        return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    # bool is an int subclass: true/false where a number belongs is an error.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, lo: int, hi: int, note: str = CAP) -> int:
    """``value`` as an int in ``lo..hi``; ``note`` says where ``hi`` comes from."""
    if _is_int(value) and lo <= value <= hi:
        return int(value)
    why = f" ({note})" if _is_int(value) and value > hi and note else ""
    raise ConfigError(
        f"{name} must be an integer in {lo}..{hi}{why}, got {show(value)}"
    )


def check_kind(name: str, value: Any, kind: str) -> int:
    """``check_int`` against the range of ``kind`` (a key of ``INTS``)."""
    lo, hi = INTS[kind]
    return check_int(name, value, lo, hi)


def check_float(name: str, value: Any, hi: float) -> float:
    """``value`` as a finite float in (0, hi]; ints are numbers too, bools not."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            v = float(value)
        except OverflowError:  # an int too large for a float
            v = math.inf
        if math.isfinite(v) and 0 < v <= hi:
            return v
        if math.isfinite(v) and v > hi:
            raise ConfigError(
                f"{name} must be a finite number in (0, {hi:g}] ({CAP}), "
                f"got {show(value)}"
            )
    raise ConfigError(
        f"{name} must be a finite number in (0, {hi:g}], got {show(value)}"
    )


def check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be true or false, got {show(value)}")


def check_token_ids(name: str, ids: Any, n_vocab: int) -> tuple[int, ...]:
    """A tuple of token ids, each in the vocabulary."""
    if not isinstance(ids, tuple) or len(ids) > MAX_EOS:
        raise ConfigError(
            f"{name} must be a list of at most {MAX_EOS} token ids, got {show(ids)}"
        )
    return tuple(check_token_id(name, t, n_vocab) for t in ids)


def check_token_id(name: str, value: Any, n_vocab: int) -> int:
    return check_int(
        name, value, 0, n_vocab - 1, f"the vocabulary has {n_vocab} tokens"
    )


def check_hf_value(
    name: str, annotation: str, value: Any, kind_of: str | None = None
) -> Any:
    """One config.json value against its ``HFConfig`` field's type and range.

    ``annotation`` is the field's annotation as written (``"int | None"``);
    ``kind_of`` the field's name where ``name`` is an alias the file used.
    A key ``HF_KINDS`` does not know is checked for type only, with an int32
    range so nothing downstream can overflow a C int.
    """
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    if value is None and (optional or base.startswith("list")):
        return value  # derived from other fields, or an empty list
    kind = HF_KINDS.get(kind_of or name)
    if base == "int":
        if kind is None:
            return check_int(name, value, 0, 2**31 - 1)
        return check_kind(name, value, kind)
    if base == "float":
        return check_float(name, value, FLOATS[kind] if kind else MAX_CLIP)
    if base == "bool":
        return check_bool(name, value)
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {show(value)}")
        return value
    if base == "list[int]":
        if not isinstance(value, list) or len(value) > MAX_LAYER:
            raise ConfigError(
                f"{name} must be a list of at most {MAX_LAYER} integers, "
                f"got {show(value)}"
            )
        return [check_kind(name, v, kind or "layer_index") for v in value]
    return value  # ``Any``: the family checks it (eos_token_id: eos_tuple)


def check_spec(spec: Any) -> dict[str, float]:
    """Every ModelSpec field's type, finiteness and range, then the rules that
    tie fields together. Returns the float fields as floats (an int rope_theta
    from JSON is fine, and ggml gets a float either way)."""
    if not isinstance(spec.family, str) or not spec.family:
        raise ConfigError(f"family must be a name, got {show(spec.family)}")
    for name in SPEC_INTS:
        check_kind(name, getattr(spec, name), name)
    floats = {
        n: check_float(n, getattr(spec, n), FLOATS[n])
        for n in FLOATS
        if getattr(spec, n) is not None
        or n not in ("clip_qkv", "rope_attn_factor", "attn_scale")
    }
    if spec.sliding_window is not None:
        check_kind("sliding_window", spec.sliding_window, "sliding_window")
    for name in BOOLS:
        check_bool(name, getattr(spec, name))
    for name, kinds in (
        ("attention", ATTENTION_KINDS),
        ("router", ROUTER_KINDS),
        ("qk_norm", QK_NORM_KINDS),
        ("rope_scaling", ROPE_SCALING_KINDS),
        ("ffn_act", FFN_ACT_KINDS),
    ):
        if getattr(spec, name) not in kinds:
            raise ConfigError(
                f"{name} must be one of {', '.join(map(repr, kinds))}, "
                f"got {show(getattr(spec, name))}"
            )
    layers = spec.moe_layers
    if not isinstance(layers, tuple) or not all(isinstance(m, bool) for m in layers):
        raise ConfigError(
            f"moe_layers must list true/false for each layer, got {show(layers)}"
        )
    if len(layers) != spec.n_layer:
        raise ConfigError(
            f"moe_layers has {len(layers)} entries for {spec.n_layer} layers"
        )
    swa = spec.swa_layers
    if not isinstance(swa, tuple) or not all(isinstance(m, bool) for m in swa):
        raise ConfigError(
            f"swa_layers must list true/false for each layer, got {show(swa)}"
        )
    if swa and len(swa) != spec.n_layer:
        raise ConfigError(
            f"swa_layers has {len(swa)} entries for {spec.n_layer} layers"
        )
    if any(swa) and spec.sliding_window is None:
        raise ConfigError(
            "swa_layers marks windowed layers but sliding_window is unset"
        )
    if spec.rope_scaling == "yarn" and spec.rope_orig_ctx < 1:
        raise ConfigError(
            f"YaRN RoPE needs its original context (rope_orig_ctx), "
            f"got {show(spec.rope_orig_ctx)}"
        )
    _check_shapes(spec)
    if spec.bos_token_id is not None:
        check_token_id("bos_token_id", spec.bos_token_id, spec.n_vocab)
    check_token_ids("eos_token_ids", spec.eos_token_ids, spec.n_vocab)
    return floats


def _check_shapes(spec: Any) -> None:
    if spec.n_head % spec.n_head_kv:
        raise ConfigError(
            f"n_head {spec.n_head} is not a multiple of n_head_kv {spec.n_head_kv}"
        )
    if spec.head_dim % 2:
        raise ConfigError(
            f"head_dim must be even (RoPE rotates pairs), got {spec.head_dim}"
        )
    if any(spec.moe_layers):
        if not 0 < spec.n_expert_used <= spec.n_expert:
            raise ConfigError(
                f"experts per token (n_expert_used) {spec.n_expert_used} must be "
                f"in 1..{spec.n_expert} (the expert count)"
            )
        if spec.expert_ffn <= 0:
            raise ConfigError(
                f"expert FFN size (expert_ffn) must be positive, got {spec.expert_ffn}"
            )
    if (
        spec.attention == "mla"
        and min(spec.kv_lora_rank, spec.qk_nope_dim, spec.v_head_dim) <= 0
    ):
        raise ConfigError(
            f"MLA attention needs kv_lora_rank, qk_nope_dim and v_head_dim > 0, got "
            f"{spec.kv_lora_rank}, {spec.qk_nope_dim}, {spec.v_head_dim}"
        )
    if spec.n_group and (
        spec.n_expert % spec.n_group or not 0 < spec.topk_group <= spec.n_group
    ):
        raise ConfigError(
            f"{spec.n_expert} experts in n_group {spec.n_group} groups, topk_group "
            f"{spec.topk_group}: the groups must divide the experts and 1 <= "
            f"topk_group <= n_group"
        )
    if not all(spec.moe_layers) and spec.dense_ffn <= 0:
        raise ConfigError(
            f"a dense layer needs a positive intermediate size (dense_ffn), "
            f"got {spec.dense_ffn}"
        )
