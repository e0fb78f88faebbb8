"""What every architecture family shares: the normalised ModelSpec, config parsing
and the HF -> GGUF tensor-name table machinery.

Internal tensor names are llama.cpp's GGUF names (``blk.{bid}.ffn_gate_exps.weight``),
so GGUF input maps by identity and HF input goes through one table per family.
Expert tensors are stacked ``[E, N, K]`` exactly as llama.cpp stores them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgemoe.arch.validate import (
    FLOATS,
    MAX_EOS,
    check_float,
    check_hf_value,
    check_kind,
    check_spec,
)
from edgemoe.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Shape and math of one model, in the terms the runtime's blocks read.

    Families translate their HF config or GGUF metadata into this; the runtime
    never looks at a family's own config. New math (MLA attention, grouped
    sigmoid routing) is a new ``attention``/``router`` kind, not a new field set.
    """

    family: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    rope_interleaved: bool = False
    """GGUF ``llama`` rotates pairs (2i, 2i+1); HF checkpoints rotate halves (NeoX)."""
    attention: str = "gqa"
    """"gqa", or "mla" (DeepSeek's latent attention: the fields below; the
    cache holds each token's normed latent and its RoPE key, shared by every
    head; ``head_dim`` is the RoPE part)."""
    q_lora_rank: int = 0
    """MLA: rank of the query's low-rank projection (0: a full projection)."""
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0
    attn_scale: float | None = None
    """The softmax's scale; None: 1 / sqrt(query head size)."""
    qk_norm: str | None = None
    """None, "head" (RMSNorm over each head, Qwen3) or "full" (over the whole
    projection, OLMoE)."""
    clip_qkv: float | None = None
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()
    """Per layer: True where ``sliding_window`` applies (gpt-oss alternates
    windowed and full layers); () applies it to every layer."""
    attn_bias: bool = False
    """q, k, v and the output projection all carry biases (gpt-oss); else
    each is optional (Qwen2-MoE has q/k/v's)."""
    attn_sinks: bool = False
    """A learned logit per head joins each softmax and takes its share
    (``blk.N.attn_sinks.weight``, gpt-oss)."""
    rope_scaling: str | None = None
    """None, or "yarn": the frequencies of YaRN below."""
    rope_factor: float = 1.0
    rope_orig_ctx: int = 0
    """YaRN's original context (``original_max_position_embeddings``)."""
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attn_factor: float | None = None
    """YaRN's scale of cos and sin; None: 0.1·ln(rope_factor) + 1."""
    rope_truncate: bool = True
    """YaRN's correction range rounded to whole dimensions (transformers'
    default, and llama.cpp's only way); gpt-oss's config turns it off."""
    router: str = "softmax_topk"
    """"softmax_topk": top-k of the softmax over all experts; "topk_softmax":
    softmax over the k largest logits (gpt-oss)."""
    n_expert: int = 0
    n_expert_used: int = 0
    expert_ffn: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k routing weights to sum to one."""
    n_group: int = 0
    topk_group: int = 0
    """Group-limited routing (DeepSeek): experts in ``n_group`` groups, a
    token picks only from its ``topk_group`` best groups; 0: no groups."""
    routed_scale: float = 1.0
    """Routing weights multiplied by this (DeepSeek's routed_scaling_factor)."""
    shared_expert_ffn: int = 0
    shared_expert_gated: bool = False
    """Shared expert output scaled by sigmoid(x . w) (Qwen2-MoE)."""
    moe_bias: bool = False
    """The router and every expert projection carry a bias (gpt-oss)."""
    ffn_act: str = "swiglu"
    """"swiglu", or "swiglu_oai": gate clamped above at ``swiglu_limit``, up
    clamped to ±limit, gate·σ(alpha·gate)·(up + 1) (gpt-oss's experts)."""
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    dense_ffn: int = 0
    moe_layers: tuple[bool, ...] = ()
    """Per layer: True for a sparse MoE block, False for a dense MLP."""
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Every source ends here, so a manifest cannot skip what config.json and
        # GGUF metadata are held to (edgemoe/arch/validate.py has the rules).
        for name, value in check_spec(self).items():
            object.__setattr__(self, name, value)  # int -> float, still frozen


@dataclass
class HFConfig:
    """Base of each family's ``ArchConfig``: HF field names, unknown keys dropped."""

    aliases: ClassVar[dict[str, str]] = {}
    """Other spellings of a field (transformers' ``attribute_map``): the hub's
    configs and ``save_pretrained`` do not always agree."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        keys = {k: k for k in kept}  # the spelling the file used, for errors
        for alias, name in cls.aliases.items():
            if alias in d and name not in kept:
                kept[name], keys[name] = d[alias], alias
        # Type and range of every value before the family computes with it
        # (hidden // heads, (True,) * layers): one ConfigError naming the key.
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        try:
            kept = {
                k: check_hf_value(keys[k], types[k], v, kind_of=k)
                for k, v in kept.items()
            }
        except ConfigError as e:
            raise ConfigError(f"config.json: {e}") from None
        try:
            cfg = cls(**kept)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None
        return cfg


def rope_theta_of(d: dict[str, Any], default: float = 10000.0) -> float:
    """RoPE base from either a top-level ``rope_theta`` (hub checkpoints) or the
    ``rope_parameters`` object transformers 5 writes; scaled RoPE is refused."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"config.json: rope_type {rope_type!r} is not supported")
    theta = params.get("rope_theta", d.get("rope_theta", default))
    try:
        return check_float("rope_theta", theta, FLOATS["rope_theta"])
    except ConfigError as e:
        raise ConfigError(f"config.json: {e}") from None


def eos_tuple(value: Any) -> tuple[int, ...]:
    """``eos_token_id``: null, one id or a list (range against the vocabulary
    is ModelSpec's check)."""
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if len(ids) > MAX_EOS:
        raise ConfigError(
            f"config.json: eos_token_id lists {len(ids)} ids, at most {MAX_EOS}"
        )
    try:
        return tuple(check_kind("eos_token_id", v, "token_id") for v in ids)
    except ConfigError as e:
        raise ConfigError(f"config.json: {e}") from None


@dataclass(frozen=True)
class Part:
    """An internal tensor cut from a stacked ``[E, ...]`` source tensor: its
    last two axes swapped if ``transpose``, then every ``step``-th index of
    axis 1 from ``first``. gpt-oss stores each expert's gate and up as one
    ``x @ W`` matrix, their columns interleaved."""

    name: str
    transpose: bool = False
    first: int = 0
    step: int = 1
    mxfp4: str | None = None
    """"blocks" or "scales": one half of an MXFP4 tensor in the HF layout
    (``[E, N, G, 16]`` codes, ``[E, N, G]`` scale bytes; edgemoe.quant.mxfp4)."""

    def shape(self, src: tuple[int, ...], spec: ModelSpec) -> tuple[int, ...]:
        """The cut's shape from the source's (an axis too short for the cut
        gives 0, which no layout expects), in weights."""
        out = list(src)
        if self.mxfp4 == "blocks" and len(out) >= 2:
            out = [*out[:-2], out[-2] * out[-1] * 2]
        elif self.mxfp4 == "scales" and out:
            out[-1] *= 32
        if self.transpose and len(out) >= 3:
            out[-1], out[-2] = out[-2], out[-1]
        if len(out) >= 2:
            out[1] = max(0, out[1] - self.first + self.step - 1) // self.step
        return tuple(out)

    def fraction(self, src: tuple[int, ...], spec: ModelSpec) -> float:
        """The share of the source's bytes the cut holds."""
        return 1 / self.step

    @staticmethod
    def joined_shape(cut: list, spec: ModelSpec) -> tuple[int, ...]:
        """The source's shape from [(part, the part's shape)]."""
        first, shape = cut[0]
        out = [*shape[:1], shape[1] * first.step, *shape[2:]]
        if first.transpose and len(out) >= 3:
            out[-1], out[-2] = out[-2], out[-1]
        return tuple(out)

    @staticmethod
    def join(cut: list, spec: ModelSpec):
        """The inverse of cutting: the source from [(part, array)] (float
        parts of one source; synthetic checkpoints write it)."""
        import numpy as np

        first, a0 = cut[0]
        shape = list(a0.shape)
        shape[1] *= first.step
        full = np.empty(shape, np.float32)
        for part, a in cut:
            full[:, part.first :: part.step] = a
        return full.swapaxes(-1, -2) if first.transpose and full.ndim >= 3 else full

    def cut(self, a, spec: ModelSpec):
        """The cut of array ``a`` (a strided view)."""
        if self.transpose and a.ndim >= 3:
            a = a.swapaxes(-1, -2)
        return a[:, self.first :: self.step]


@dataclass(frozen=True)
class LatentPart(Part):
    """DeepSeek's ``kv_b_proj`` [H * (nope + v), kv_lora] cut per head into
    the latent's key expansion (``first`` 0: [H, kv_lora, nope], transposed)
    or its value expansion (``first`` 1: [H, v, kv_lora])."""

    def shape(self, src: tuple[int, ...], spec: ModelSpec) -> tuple[int, ...]:
        h, nope, v = spec.n_head, spec.qk_nope_dim, spec.v_head_dim
        if len(src) != 2 or src[0] != h * (nope + v):
            return (0,)  # no layout expects it: named as a shape mismatch
        return (h, src[1], nope) if self.first == 0 else (h, v, src[1])

    def fraction(self, src: tuple[int, ...], spec: ModelSpec) -> float:
        nope, v = spec.qk_nope_dim, spec.v_head_dim
        return (nope if self.first == 0 else v) / (nope + v)

    @staticmethod
    def joined_shape(cut: list, spec: ModelSpec) -> tuple[int, ...]:
        h, nope, v = spec.n_head, spec.qk_nope_dim, spec.v_head_dim
        return (h * (nope + v), spec.kv_lora_rank)

    @staticmethod
    def join(cut: list, spec: ModelSpec):
        import numpy as np

        k_b, v_b = (a for _, a in sorted(cut, key=lambda pa: pa[0].first))
        per_head = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1)  # [H, nope+v, L]
        return per_head.reshape(-1, per_head.shape[-1])

    def cut(self, a, spec: ModelSpec):
        h, nope = spec.n_head, spec.qk_nope_dim
        per_head = a.reshape(h, -1, a.shape[-1])  # [H, nope + v, kv_lora]
        if self.first == 0:
            return per_head[:, :nope].swapaxes(1, 2)
        return per_head[:, nope:]


@dataclass(frozen=True)
class TensorRoute:
    """Where one source tensor goes: an internal name, and the expert slot if the
    target is a stacked ``[E, N, K]`` tensor, or the part of it cut out."""

    name: str
    expert: int | None = None
    part: Part | None = None


@dataclass
class TensorMap:
    """HF name templates (``{bid}`` layer, ``{xid}`` expert) -> GGUF names, or
    to the ``Part``s cut from a stacked source."""

    table: dict[str, str | tuple[Part, ...]]
    _compiled: list[tuple[re.Pattern[str], str | tuple[Part, ...]]] = field(
        default_factory=list
    )

    def __post_init__(self) -> None:
        for src, dst in self.table.items():
            pat = re.escape(src).replace(r"\{bid\}", r"(?P<bid>\d+)")
            pat = pat.replace(r"\{xid\}", r"(?P<xid>\d+)")
            self._compiled.append((re.compile(pat + r"\Z"), dst))

    def source_names(self, name: str, n_expert: int) -> list[tuple[str, int | None]]:
        """The HF names internal tensor ``name`` is made of, with expert slots;
        the first matching table entry wins (the inverse of ``route``)."""
        for src, dst in self.table.items():
            for target in (dst,) if isinstance(dst, str) else (p.name for p in dst):
                pat = re.escape(target).replace(r"\{bid\}", r"(?P<bid>\d+)")
                m = re.fullmatch(pat, name)
                if m is None:
                    continue
                bid = m.groupdict().get("bid", "")
                if "{xid}" in src:
                    return [(src.format(bid=bid, xid=e), e) for e in range(n_expert)]
                return [(src.format(bid=bid), None)]
        return []

    def route(self, hf_name: str) -> list[TensorRoute]:
        """Where source ``hf_name`` goes: [] if nowhere, several routes for a
        source cut into parts."""
        for pat, dst in self._compiled:
            m = pat.match(hf_name)
            if m:
                groups = m.groupdict()
                bid = groups.get("bid", "")
                if not isinstance(dst, str):
                    return [TensorRoute(p.name.format(bid=bid), part=p) for p in dst]
                xid = groups.get("xid")
                return [
                    TensorRoute(
                        dst.format(bid=bid), int(xid) if xid is not None else None
                    )
                ]
        return []


class Family:
    """One architecture family. Subclasses set the class attributes and parse."""

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_architectures: ClassVar[tuple[str, ...]] = ()
    """The first entry is the architecture our GGUF writer emits."""
    gguf_rope_interleaved: ClassVar[bool] = False
    """llama.cpp's converter permutes Q/K rows for pairwise RoPE (``llama``)."""
    tensor_map: ClassVar[TensorMap]
    gguf_renames: ClassVar[dict[str, str]] = {}
    """Tensor name endings llama.cpp spells otherwise for this architecture
    (internal -> GGUF)."""

    @classmethod
    def to_gguf_name(cls, name: str) -> str:
        for ours, theirs in cls.gguf_renames.items():
            if name.endswith("." + ours):
                return name[: -len(ours)] + theirs
        return name

    @classmethod
    def from_gguf_name(cls, name: str) -> str:
        for ours, theirs in cls.gguf_renames.items():
            if name.endswith("." + theirs):
                return name[: -len(theirs)] + ours
        return name

    @classmethod
    def spec_from_hf(cls, config: dict[str, Any]) -> ModelSpec:
        raise NotImplementedError

    @classmethod
    def spec_from_gguf(cls, meta: GGUFMeta) -> ModelSpec:
        raise NotImplementedError

    @classmethod
    def gguf_fields(cls, spec: ModelSpec) -> dict[str, int | float]:
        """``{arch}.*`` metadata llama.cpp reads for this family (keys without
        the arch prefix); the inverse of ``spec_from_gguf``."""
        return common_gguf_fields(spec)

    @classmethod
    def llamacpp_refusal(cls, spec: ModelSpec) -> str | None:
        """Why llama.cpp's graph would compute ``spec`` otherwise where its
        metadata, written and read back, would not show it; None if not."""
        return None


def common_gguf_fields(spec: ModelSpec) -> dict[str, int | float]:
    return {
        "context_length": spec.n_ctx_train,
        "embedding_length": spec.n_embd,
        "block_count": spec.n_layer,
        "attention.head_count": spec.n_head,
        "attention.head_count_kv": spec.n_head_kv,
        "attention.key_length": spec.head_dim,
        "attention.value_length": spec.head_dim,
        "rope.dimension_count": spec.head_dim,
        "rope.freq_base": float(spec.rope_theta),
        "attention.layer_norm_rms_epsilon": float(spec.rms_eps),
        "expert_count": spec.n_expert,
        "expert_used_count": spec.n_expert_used,
        "vocab_size": spec.n_vocab,
    }


class GGUFMeta:
    """Typed access to ``{arch}.*`` GGUF keys with clear errors for missing ones."""

    def __init__(self, arch: str, fields: dict[str, Any], source: str):
        self.arch = arch
        self.fields = fields
        self.source = source

    def get(self, key: str, default: Any = ..., *, arch_key: bool = True) -> Any:
        full = f"{self.arch}.{key}" if arch_key else key
        if full in self.fields:
            return self.fields[full]
        if default is ...:
            raise ConfigError(f"{self.source}: GGUF metadata key {full!r} is missing")
        return default

    def get_int(self, key: str, kind: str, default: Any = ...) -> int:
        """``{arch}.key`` checked against the range of ``kind`` (validate.INTS)."""
        return self._int(f"{self.arch}.{key}", self.get(key, default), kind)

    def get_float(self, key: str, field: str, default: Any = ...) -> float:
        """``{arch}.key`` as a finite float in ModelSpec ``field``'s range."""
        value = self.get(key, default)
        try:
            return check_float(f"{self.arch}.{key}", value, FLOATS[field])
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from None

    def _int(self, full_key: str, value: Any, kind: str) -> int:
        try:
            return check_kind(full_key, value, kind)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from None

    def make_spec(self, **fields: Any) -> ModelSpec:
        """``ModelSpec(**fields)`` with a failed check naming this file."""
        try:
            return ModelSpec(**fields)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from None

    def common_spec(self, family: str, **extra: Any) -> dict[str, Any]:
        """The fields every GQA family reads the same way from llama.cpp metadata,
        each checked before it is used (``n_embd // n_head``, per-layer tuples)."""
        n_embd = self.get_int("embedding_length", "n_embd")
        n_head = self.get_int("attention.head_count", "n_head")
        n_layer = self.get_int("block_count", "n_layer")
        if f"{self.arch}.vocab_size" in self.fields:
            n_vocab = self.get_int("vocab_size", "n_vocab")
        else:
            tokens = self.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"{self.source}: no vocab_size and no token list")
            n_vocab = self._int("tokenizer.ggml.tokens (count)", len(tokens), "n_vocab")
        ids = {}
        for k in ("bos", "eos", "eot"):
            key = f"tokenizer.ggml.{k}_token_id"
            if self.fields.get(key) is not None:
                ids[k] = self._int(key, self.fields[key], "token_id")
        spec = dict(
            family=family,
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=self.get_int("attention.head_count_kv", "n_head_kv", n_head),
            head_dim=self.get_int("attention.key_length", "head_dim", n_embd // n_head),
            n_ctx_train=self.get_int("context_length", "n_ctx_train", 4096),
            rms_eps=self.get_float("attention.layer_norm_rms_epsilon", "rms_eps"),
            rope_theta=self.get_float("rope.freq_base", "rope_theta", 10000.0),
            n_expert=self.get_int("expert_count", "n_expert", 0),
            n_expert_used=self.get_int("expert_used_count", "n_expert_used", 0),
            bos_token_id=ids.get("bos"),
            eos_token_ids=tuple(ids[k] for k in ("eos", "eot") if k in ids),
        )
        spec.update(extra)
        return spec
