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
    qk_norm: str | None = None
    """None, "head" (RMSNorm over each head, Qwen3) or "full" (over the whole
    projection, OLMoE)."""
    clip_qkv: float | None = None
    sliding_window: int | None = None
    router: str = "softmax_topk"
    n_expert: int = 0
    n_expert_used: int = 0
    expert_ffn: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k routing weights to sum to one."""
    shared_expert_ffn: int = 0
    shared_expert_gated: bool = False
    """Shared expert output scaled by sigmoid(x . w) (Qwen2-MoE)."""
    dense_ffn: int = 0
    moe_layers: tuple[bool, ...] = ()
    """Per layer: True for a sparse MoE block, False for a dense MLP."""
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.moe_layers) != self.n_layer:
            raise ConfigError(
                f"moe_layers has {len(self.moe_layers)} entries for "
                f"{self.n_layer} layers"
            )
        for name in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_head_kv:
            raise ConfigError(
                f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}"
            )
        if any(self.moe_layers):
            if not 0 < self.n_expert_used <= self.n_expert:
                raise ConfigError(
                    f"experts per token {self.n_expert_used} must be in "
                    f"1..{self.n_expert} (the expert count)"
                )
            if self.expert_ffn <= 0:
                raise ConfigError("expert FFN size must be positive")
        if not all(self.moe_layers) and self.dense_ffn <= 0:
            raise ConfigError("a dense layer needs a positive intermediate size")


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
        for alias, name in cls.aliases.items():
            if alias in d and name not in kept:
                kept[name] = d[alias]
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
    return float(theta)


def eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


@dataclass(frozen=True)
class TensorRoute:
    """Where one source tensor goes: an internal name, and the expert slot if the
    target is a stacked ``[E, N, K]`` tensor."""

    name: str
    expert: int | None = None


@dataclass
class TensorMap:
    """HF name templates (``{bid}`` layer, ``{xid}`` expert) -> GGUF names."""

    table: dict[str, str]
    _compiled: list[tuple[re.Pattern[str], str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for src, dst in self.table.items():
            pat = re.escape(src).replace(r"\{bid\}", r"(?P<bid>\d+)")
            pat = pat.replace(r"\{xid\}", r"(?P<xid>\d+)")
            self._compiled.append((re.compile(pat + r"\Z"), dst))

    def source_names(self, name: str, n_expert: int) -> list[tuple[str, int | None]]:
        """The HF names internal tensor ``name`` is made of, with expert slots;
        the first matching table entry wins (the inverse of ``route``)."""
        for src, dst in self.table.items():
            pat = re.escape(dst).replace(r"\{bid\}", r"(?P<bid>\d+)")
            m = re.fullmatch(pat, name)
            if m is None:
                continue
            bid = m.groupdict().get("bid", "")
            if "{xid}" in src:
                return [(src.format(bid=bid, xid=e), e) for e in range(n_expert)]
            return [(src.format(bid=bid), None)]
        return []

    def route(self, hf_name: str) -> TensorRoute | None:
        for pat, dst in self._compiled:
            m = pat.match(hf_name)
            if m:
                groups = m.groupdict()
                name = dst.format(bid=groups.get("bid", ""))
                xid = groups.get("xid")
                return TensorRoute(name, int(xid) if xid is not None else None)
        return None


class Family:
    """One architecture family. Subclasses set the class attributes and parse."""

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_architectures: ClassVar[tuple[str, ...]] = ()
    """The first entry is the architecture our GGUF writer emits."""
    gguf_rope_interleaved: ClassVar[bool] = False
    """llama.cpp's converter permutes Q/K rows for pairwise RoPE (``llama``)."""
    tensor_map: ClassVar[TensorMap]

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

    def common_spec(self, family: str, **extra: Any) -> dict[str, Any]:
        """The fields every GQA family reads the same way from llama.cpp metadata."""
        n_embd = int(self.get("embedding_length"))
        n_head = int(self.get("attention.head_count"))
        n_layer = int(self.get("block_count"))
        n_vocab = self.get("vocab_size", None)
        if n_vocab is None:
            tokens = self.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"{self.source}: no vocab_size and no token list")
            n_vocab = len(tokens)
        eos = self.fields.get("tokenizer.ggml.eos_token_id")
        eot = self.fields.get("tokenizer.ggml.eot_token_id")
        spec = dict(
            family=family,
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=int(self.get("attention.head_count_kv", n_head)),
            head_dim=int(self.get("attention.key_length", n_embd // n_head)),
            n_ctx_train=int(self.get("context_length", 4096)),
            rms_eps=float(self.get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.get("rope.freq_base", 10000.0)),
            n_expert=int(self.get("expert_count", 0)),
            n_expert_used=int(self.get("expert_used_count", 0)),
            bos_token_id=self.fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(int(t) for t in (eos, eot) if t is not None),
        )
        spec.update(extra)
        return spec
