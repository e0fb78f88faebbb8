"""RoPE settings from an HF config.json, YaRN included: ModelSpec's
``rope_*`` fields, each checked and named. Shared by the families whose
checkpoints scale RoPE with YaRN (gpt-oss, DeepSeek); a helper, not a family.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from edgemoe.arch.validate import FLOATS, check_float
from edgemoe.errors import ConfigError

if TYPE_CHECKING:
    from edgemoe.arch.base import GGUFMeta, ModelSpec


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """transformers' ``get_mscale``: YaRN's attention scale for ``factor``."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_fields(config: dict[str, Any], family: str, theta: float) -> dict[str, Any]:
    """``rope_theta`` and, for YaRN, the ``rope_*`` fields of ModelSpec, from
    ``rope_parameters`` (transformers 5) or ``rope_scaling`` and a top-level
    ``rope_theta`` (the hub's configs); ``theta``: the family's default. The
    YaRN parameters are returned under ``"yarn"`` too, for a family's own
    extras (DeepSeek's mscale)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(
            f"config.json: rope_parameters must be an object, got {params!r}"
        )
    kind = params.get("rope_type", params.get("type", "default"))

    def num(key: str, value: Any, field: str) -> float:
        return check_float(f"config.json: rope_parameters.{key}", value, FLOATS[field])

    theta = params.get("rope_theta", config.get("rope_theta", theta))
    out: dict[str, Any] = {"rope_theta": num("rope_theta", theta, "rope_theta")}
    if kind in ("default", None):
        return out
    if kind != "yarn":
        raise ConfigError(
            f"config.json: rope_type {kind!r} is not supported for {family}"
        )
    orig = params.get("original_max_position_embeddings")
    if type(orig) is not int or orig < 1:
        raise ConfigError(
            "config.json: rope_parameters.original_max_position_embeddings must be "
            f"a positive integer, got {orig!r}"
        )
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(
            f"config.json: rope_parameters.truncate must be true or false, got {truncate!r}"
        )
    attn = params.get("attention_factor")
    extras = {
        k: num(k, params[k], "rope_factor")
        for k in ("mscale", "mscale_all_dim")
        if params.get(k)
    }
    out.update(
        rope_scaling="yarn",
        rope_factor=num("factor", params.get("factor"), "rope_factor"),
        rope_orig_ctx=orig,
        rope_beta_fast=num(
            "beta_fast", params.get("beta_fast") or 32.0, "rope_beta_fast"
        ),
        rope_beta_slow=num(
            "beta_slow", params.get("beta_slow") or 1.0, "rope_beta_slow"
        ),
        rope_truncate=truncate,
        rope_attn_factor=(
            None if attn is None else num("attention_factor", attn, "rope_attn_factor")
        ),
        yarn=extras,
    )
    return out


def gguf_yarn(meta: GGUFMeta) -> dict[str, Any]:
    """YaRN's ``rope_*`` fields from llama.cpp's ``rope.scaling.*`` keys; {}
    without scaling. Each family adds its own attention scales."""
    kind = meta.get("rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind != "yarn":
        raise ConfigError(
            f"{meta.source}: {meta.arch}.rope.scaling.type {kind!r} (none or yarn)"
        )
    return dict(
        rope_scaling="yarn",
        rope_factor=meta.get_float("rope.scaling.factor", "rope_factor"),
        rope_orig_ctx=meta.get_int(
            "rope.scaling.original_context_length", "rope_orig_ctx"
        ),
        rope_beta_fast=meta.get_float(
            "rope.scaling.yarn_beta_fast", "rope_beta_fast", 32.0
        ),
        rope_beta_slow=meta.get_float(
            "rope.scaling.yarn_beta_slow", "rope_beta_slow", 1.0
        ),
    )


def yarn_gguf_fields(spec: ModelSpec) -> dict[str, Any]:
    """The inverse of ``gguf_yarn``: llama.cpp's ``rope.scaling.*`` keys."""
    return {
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": float(spec.rope_factor),
        "rope.scaling.original_context_length": spec.rope_orig_ctx,
        "rope.scaling.yarn_beta_fast": float(spec.rope_beta_fast),
        "rope.scaling.yarn_beta_slow": float(spec.rope_beta_slow),
    }
