"""DeepSeek-V2 and -V3 against transformers: MLA attention with its latent
KV cache (full and low-rank queries), YaRN with DeepSeek's mscale, V2's
softmax routing (greedy and group-limited), V3's sigmoid routing with its
correction bias and groups, shared experts, dense first layers."""

from __future__ import annotations

import numpy as np
import pytest
from refs import assert_greedy_matches, assert_logits_match, transformers_logits

import edgemoe

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)
BIAS = [0.4, -0.4, 0.2, -0.2, -0.3, 0.3, -0.1, 0.1]
"""V3's correction bias: moves choices within and across both groups."""
YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0,
    original_max_position_embeddings=64,
    beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
)  # fmt: skip

CONFIGS = {
    # DeepSeek-V2-Lite's kind: a full query, greedy softmax routing.
    "v2-lite": ("DeepseekV2Config", dict(q_lora_rank=None)),
    # V2's: a low-rank query, routing limited to the best of two groups (of 4
    # experts), scaled; YaRN with mscale.
    "v2-grouped": (
        "DeepseekV2Config",
        dict(
            q_lora_rank=48,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.0,
            rope_parameters=YARN,
        ),
    ),  # fmt: skip
    # V3's: sigmoid routing chosen with a correction bias, the best of two
    # groups by their top two, renormalised and scaled.
    "v3": (
        "DeepseekV3Config",
        dict(
            q_lora_rank=48,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    ),  # fmt: skip
}


def build(name: str, out, **overrides):
    import torch
    import transformers

    from edgemoe.converters.synth import write_tokenizer

    cls, kw = CONFIGS[name]
    cfg = getattr(transformers, cls)(
        **{**BASE, **kw, **overrides}, vocab_size=384, max_position_embeddings=1024,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.mul_(3.0)  # logits large enough to reveal errors
        for layer in model.model.layers:  # a correction bias that matters
            gate = getattr(layer.mlp, "gate", None)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.tensor(BIAS))
    model.save_pretrained(out)
    write_tokenizer(out, 384)
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = build(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(deepseek, name):
    assert_logits_match(deepseek(name), 32, seed=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_decode_matches_transformers(deepseek, name):
    assert_greedy_matches(deepseek(name), seed=2)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_600_token_prompt_matches_transformers(deepseek, name):
    """Past the window and YaRN's original context (64): every position's
    logits, prefilled in ubatches."""
    assert_logits_match(deepseek(name), 600, seed=3, n_ctx=1024)


def test_the_latent_cache_holds_the_latent_and_the_rope_key(deepseek):
    """MLA's promise: per token and layer, kv_lora_rank + qk_rope_head_dim
    floats (32 + 8 here), not the expanded keys and values (4 heads x 40)."""
    with edgemoe.load(deepseek("v2-lite"), n_ctx=256) as model:
        spec = model.spec
        assert model.cache.nbytes == spec.n_layer * 256 * (32 + 8) * 4
        assert (spec.kv_lora_rank, spec.head_dim) == (32, 8)


def test_the_configurations_exercise_the_quirks(deepseek):
    specs = {}
    for name in CONFIGS:
        with edgemoe.load(deepseek(name)) as m:
            specs[name] = m.spec
    lite, grouped, v3 = specs["v2-lite"], specs["v2-grouped"], specs["v3"]
    assert lite.q_lora_rank == 0 and grouped.q_lora_rank == 48
    assert lite.n_group == 0 and (grouped.n_group, grouped.topk_group) == (2, 1)
    assert grouped.router == "softmax_topk" and v3.router == "sigmoid_topk"
    assert grouped.rope_scaling == "yarn" and grouped.attn_scale is not None
    assert v3.norm_topk_prob and v3.routed_scale == 2.5
    assert lite.moe_layers == (False, True, True) and lite.shared_expert_ffn == 64


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("kv_lora_rank", 0, "kv_lora_rank"),
        (
            "v_head_dim",
            0,
            "MLA attention needs kv_lora_rank, qk_nope_dim and v_head_dim",
        ),
        ("qk_rope_head_dim", 7, "head_dim must be even"),
        ("n_group", 3, "8 experts in n_group 3 groups"),
        ("topk_method", "noaux_tc", "topk_method 'noaux_tc'"),
    ],
)
def test_inconsistent_configs_are_one_clear_error(
    deepseek, tmp_path, key, value, needle
):
    import json
    import shutil

    from edgemoe.errors import ConfigError

    src = deepseek("v2-grouped")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as info:
        edgemoe.load(dst)
    msg = str(info.value)
    assert needle in msg and str(dst / "config.json") in msg and "\n" not in msg


def test_what_is_not_there_yet_says_so(deepseek, tmp_path):
    """Converting into planes (calibration's numpy forward has no MLA) and
    GGUF export: typed one-line errors, nothing written."""
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.converters.llama_gguf import write_gguf
    from edgemoe.errors import ConfigError

    src = deepseek("v2-lite")
    with pytest.raises(ConfigError, match="MLA attention.*not supported yet"):
        convert(src, tmp_path / "edge", ConvertOptions())
    ckpt = open_checkpoint(src)
    try:
        with pytest.raises(ConfigError, match="writing deepseek as GGUF"):
            write_gguf(ckpt, tmp_path / "m.gguf", "F32")
    finally:
        ckpt.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("preset", ["deepseek-v2-lite", "moonlight-16b-a3b"])
def test_synth_presets_write_what_transformers_reads(tmp_path, preset):
    """The presets (narrowed) written as HF: each head's key and value
    expansions joined back into kv_b_proj; transformers loads them and
    EdgeMoE computes the same logits."""
    from edgemoe.converters.synth import preset_config, write_hf

    cfg = preset_config(
        preset, 2, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, vocab_size=384,
    )  # fmt: skip
    path = write_hf(cfg, tmp_path / preset)
    ids = np.random.default_rng(13).integers(1, 384, size=32).tolist()
    expected = transformers_logits(path, ids)
    with edgemoe.load(path) as model:
        assert model.spec.attention == "mla" and model.spec.moe_layers == (False, True)
        got = model.logits(ids)
    assert np.abs(got - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())


def test_inspect_names_the_latent_attention(deepseek, capsys):
    from test_cli import run_main

    out, _ = run_main(capsys, "inspect", deepseek("v3"))
    assert "MLA 4 heads × (16 + 8 RoPE), latent 32" in out
    assert "routing sigmoid_topk, 1 of 2 groups" in out


def test_a_kv_b_proj_of_the_wrong_size_is_named(deepseek, tmp_path):
    """kv_b_proj is cut per head by the config's head sizes: weights for other
    sizes name the stored tensor and its shape, and what it should hold."""
    import json
    import shutil

    from edgemoe.errors import ModelFileError

    dst = tmp_path / "m"
    shutil.copytree(deepseek("v2-lite"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["v_head_dim"] = 8  # the weights have 16
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError) as info:
        edgemoe.load(dst)
    msg = str(info.value)
    assert "self_attn.kv_b_proj.weight' has shape [128, 32]" in msg, msg
    assert "which does not hold blk." in msg and "\n" not in msg
