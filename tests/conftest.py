"""Shared fixtures: the trained fixture's path and tiny random models built
offline with transformers (the reference implementation) for each family."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before anything loads libgomp (torch, llama_cpp, our binding).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
CODE_MIXTRAL = FIXTURES / "code-mixtral"
VOCAB = 384

# Small but not degenerate: GQA, dims that split into Q8_0 blocks (32),
# a dense layer where the family has one, a head_dim unlike hidden/heads.
TINY_CONFIGS = {
    "mixtral": dict(
        cls="MixtralConfig",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        cls="Qwen2MoeConfig",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        cls="Qwen3MoeConfig",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),
    # gpt-oss: windowed layer first, sinks, YaRN with its unrounded range
    # (positions past original_max_position_embeddings), clamped SwiGLU.
    "gpt_oss": dict(
        cls="GptOssConfig",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=4.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=64,
        ),
        swiglu_limit=2.0,
    ),  # fmt: skip
    "olmoe": dict(
        cls="OlmoeConfig",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        clip_qkv=6.0,
    ),
}


def build_tiny(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny seeded transformers model (fp32 safetensors) plus a trained
    byte-level tokenizer into ``out``."""
    import torch
    import transformers

    from edgemoe.converters.synth import write_tokenizer

    kw = dict(TINY_CONFIGS[family])
    cls = getattr(transformers, kw.pop("cls"))
    kw.update(
        vocab_size=VOCAB,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw))
    with torch.no_grad():
        # Default init keeps logits near zero, which would hide errors.
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(out)
    write_tokenizer(out, VOCAB)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family)`` -> directory of a saved tiny model (cached)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture
def build_model(tmp_path):
    """``build_model(family, **config_overrides)`` -> a fresh tiny model dir."""
    count = iter(range(1000))

    def build(family: str, **overrides) -> Path:
        return build_tiny(family, tmp_path / f"{family}-{next(count)}", **overrides)

    return build


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (CODE_MIXTRAL / "config.json").exists():
        pytest.fail(f"trained fixture missing at {CODE_MIXTRAL}")
    return CODE_MIXTRAL


@pytest.fixture(scope="session")
def converted_fixture(fixture_dir, tmp_path_factory) -> Path:
    """The trained fixture converted (levels 2,4,8; 1,024 calibration tokens),
    once per session: offload, UI and profile tests share it."""
    from edgemoe.converters.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("converted") / "code-mixtral-edge"
    convert(fixture_dir, out, ConvertOptions(calib_tokens=1024))
    return out


@pytest.fixture
def cli(tmp_path):
    """``cli(*args)`` runs ``python -m edgemoe ARGS`` in a subprocess."""

    def run(*args, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "edgemoe", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,  # off the repo root, where `edgemoe` is the bare folder
        )

    return run
