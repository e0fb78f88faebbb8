"""DeepSeek-V2 and -V3 against transformers: MLA attention with its latent
KV cache (full and low-rank queries), YaRN with DeepSeek's mscale, V2's
softmax routing (greedy and group-limited), V3's sigmoid routing with its
correction bias and groups, shared experts, dense first layers."""

from __future__ import annotations

import numpy as np
import pytest
from refs import (
    assert_gguf_matches_llamacpp,
    assert_greedy_matches,
    assert_logits_match,
    assert_quarter_budget_lossless,
    export_gguf,
    level_errors,
    transformers_logits,
)

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
    # DeepSeek-V2-Lite's kind: a full query, greedy softmax routing, YaRN
    # with its mscale.
    "v2-lite": ("DeepseekV2Config", dict(q_lora_rank=None, rope_parameters=YARN)),
    # V2's: a low-rank query, routing limited to the best of two groups (of 4
    # experts), scaled; YaRN with mscale apart from mscale_all_dim.
    "v2-grouped": (
        "DeepseekV2Config",
        dict(
            q_lora_rank=48,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.0,
            rope_parameters={**YARN, "mscale": 1.0},
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


def hf_layer_io(src, ids) -> list[dict[str, np.ndarray]]:
    """transformers' float model on ``ids``: per decoder layer, its input
    (``x``), its attention's output, its MLP's input and output, [T, D]."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    seen: list[dict] = [{} for _ in model.model.layers]

    def keep(i: int, key: str, output: bool):
        def hook(mod, args, kwargs, out=None):
            t = out if output else (args[0] if args else kwargs["hidden_states"])
            seen[i][key] = (t[0] if isinstance(t, tuple) else t)[0].numpy()

        return hook

    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(keep(i, "x", False), with_kwargs=True)
        block.self_attn.register_forward_hook(keep(i, "attn", True), with_kwargs=True)
        block.mlp.register_forward_pre_hook(keep(i, "mlp_in", False), with_kwargs=True)
        block.mlp.register_forward_hook(keep(i, "mlp", True), with_kwargs=True)
    with torch.no_grad():
        model(torch.tensor([ids]))
    return seen


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_calibration_follows_transformers(deepseek, name):
    """Conversion's float forward (numpy), layer by layer: the latent
    attention (full and low-rank queries, YaRN) and the MoE block (V2's
    softmax; V3's sigmoid chosen with its bias and groups, renormalised and
    scaled; shared experts) give transformers' outputs, so the planes are
    fitted to statistics of the model's own activations."""
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.converters.calibration import LayerRunner, dense_mlp
    from edgemoe.converters.convert import MLA_WEIGHTS

    src = deepseek(name)
    ids = np.random.default_rng(14).integers(1, 384, size=48).tolist()
    ckpt = open_checkpoint(src)
    try:
        spec, names = ckpt.spec, set(ckpt.names())

        def w(layer: int, n: str) -> np.ndarray | None:
            full = f"blk.{layer}.{n}" + ("" if n.endswith(".bias") else ".weight")
            return ckpt.load(full).to_float32() if full in names else None

        runner = LayerRunner(spec, 64)
        for layer, hf in enumerate(hf_layer_io(src, ids)):
            ws = {
                n: w(layer, n)
                for n in ("attn_norm", "attn_q", "attn_output", *MLA_WEIGHTS)
            }
            ws = {n: v for n, v in ws.items() if v is not None}
            attn = runner.attention(hf["x"][None], ws, layer)[0] - hf["x"]
            tol = 1e-4 * max(1.0, np.abs(hf["attn"]).max())
            assert np.abs(attn - hf["attn"]).max() <= tol, layer
            hn = hf["mlp_in"]
            shared = (
                dense_mlp(
                    hn, *(w(layer, f"ffn_{p}_shexp") for p in ("gate", "up", "down"))
                )
                if spec.moe_layers[layer]
                else None
            )
            if shared is None:
                continue

            def expert(e, layer=layer):
                return tuple(
                    w(layer, f"ffn_{p}_exps")[e] for p in ("gate", "up", "down")
                )

            routed, stats = runner.moe(
                hn,
                w(layer, "ffn_gate_inp"),
                expert,
                select=w(layer, "exp_probs_b.bias"),
            )
            tol = 1e-4 * max(1.0, np.abs(hf["mlp"]).max())
            assert np.abs(routed + shared - hf["mlp"]).max() <= tol, layer
            assert stats.count.sum() == len(ids) * spec.n_expert_used
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def converted_of(deepseek, tmp_path_factory):
    """A configuration converted with a float backbone: what differs from
    transformers is the planes alone."""
    from edgemoe.converters.convert import ConvertOptions, convert

    made = {}

    def get(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp(f"{name}-edge") / "edge"
            opts = ConvertOptions(calib_tokens=512, backbone_type="F32")
            made[name] = convert(deepseek(name), out, opts).out
        return made[name]

    return get


@pytest.fixture(scope="module")
def converted(converted_of):
    """V3's kind: sigmoid routing with bias and groups, shared experts, a
    dense first layer, a low-rank query."""
    return converted_of("v3")


@pytest.mark.parametrize("name", ["v3", "v2-grouped"])
def test_converted_model_follows_transformers(deepseek, converted_of, name):
    """Level 8 (planes summing to about 8 bits) within 5% of the float model
    (1-2% measured), each lower level further away; V2's grouped softmax
    routing too, whose backbone llama.cpp could not compute but EdgeMoE's
    does."""
    ids = np.random.default_rng(9).integers(1, 384, size=32).tolist()
    expected = transformers_logits(deepseek(name), ids)
    r8, r4, r2 = level_errors(converted_of(name), expected, ids)
    assert r8 < 0.05 and r8 < r4 < r2, (r8, r4, r2)


def test_converted_model_under_a_quarter_budget_is_lossless(converted):
    """Streaming a quarter of the experts at a time gives the in-memory
    logits and the same 32 greedy tokens, and the cache keeps the latent:
    kv_lora_rank + qk_rope_head_dim floats per token and layer."""
    ids = np.random.default_rng(10).integers(1, 384, size=24).tolist()
    kv_bytes = assert_quarter_budget_lossless(converted, ids)
    assert kv_bytes == 3 * 256 * (32 + 8) * 4  # 3 layers, n_ctx 256, float32


@pytest.mark.parametrize("quality", ["balanced", "fast"])
def test_presets_in_the_graph_equal_the_host_path(converted, quality):
    """Dual routing's mixed levels with V3's routing: the in-graph path and
    the host-routed path give the same logits, unlike any forced level."""
    from test_step import presets_in_graph_equal_host_path

    prompt = np.random.default_rng(12).integers(1, 384, size=24).tolist()
    presets_in_graph_equal_host_path(converted, quality, prompt)


VARIANTS = {
    # mscale apart from mscale_all_dim: cos and sin scaled, which llama.cpp
    # takes as rope.scaling.attn_factor.
    "v2-lite-mscale": ("v2-lite", {**YARN, "mscale": 1.0}),
    # No mscale at all: the softmax keeps 1/sqrt(d) while cos and sin are
    # scaled, a negative yarn_log_multiplier for llama.cpp.
    "v3-yarn": ("v3", {k: v for k, v in YARN.items() if "mscale" not in k}),
}


@pytest.mark.llama
@pytest.mark.parametrize(
    "name, qtype",
    [
        ("v2-lite", "F32"),
        ("v3", "F32"),
        ("v3", "Q8_0"),
        ("v2-lite-mscale", "F32"),
        ("v3-yarn", "F32"),
    ],
)
def test_our_gguf_matches_llamacpp_and_transformers(deepseek, tmp_path, name, qtype):
    """Our ``deepseek2`` GGUF in llama.cpp: 32 greedy tokens and the logits at
    every prompt position agree with EdgeMoE on the same file; EdgeMoE on the
    float file agrees with transformers on the HF original. V3's sigmoid
    routing with its bias and groups; V2-Lite's YaRN (mscale = mscale_all_dim)
    and the two others llama.cpp writes otherwise (see VARIANTS)."""
    if name in VARIANTS:
        base, rope = VARIANTS[name]
        src = build(base, tmp_path / name, rope_parameters=rope)
    else:
        src = deepseek(name)
    path = export_gguf(src, tmp_path / f"{name}-{qtype}.gguf", qtype)
    prompt = np.random.default_rng(7).integers(1, 384, size=32).tolist()
    ours, spec = assert_gguf_matches_llamacpp(path, prompt, rel=True)
    assert spec.attention == "mla"
    if qtype == "F32":
        hf = transformers_logits(src, prompt)
        assert np.abs(ours - hf).max() <= 1e-3 * max(1.0, np.abs(hf).max())


def test_export_refuses_what_llamacpp_computes_otherwise(deepseek, tmp_path):
    """V2's group-limited routing scores a group by its best expert, llama.cpp's
    deepseek2 by its two best; a V3 that rotates RoPE halves
    (``rope_interleave: false``, which EdgeMoE computes as transformers does)
    where llama.cpp rotates pairs. Each refused by name, nothing written."""
    from edgemoe.errors import ConfigError

    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match="two best experts.*V2's group-limited"):
        export_gguf(deepseek("v2-grouped"), out, "F32")
    halves = build("v3", tmp_path / "halves", rope_interleave=False)
    assert_logits_match(halves, 32, seed=15)
    with pytest.raises(
        ConfigError, match="rotates RoPE pairs; this model rotates halves"
    ):
        export_gguf(halves, out, "F32")
    assert not out.exists()


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


@pytest.mark.parametrize(
    "cos_sin, softmax",
    [(1.0, 1.3), (1.2, 1.2**2), (1.14, 1.0), (0.9, 2.0)],
)
def test_yarn_scales_round_trip_through_llamacpp_keys(deepseek, cos_sin, softmax):
    """Any cos/sin scale and softmax scale (times 1/sqrt(d)) is written as
    llama.cpp's attn_factor and yarn_log_multiplier (absent when the softmax
    scale is the square of the other: 0 is not storable) and read back."""
    import dataclasses

    from edgemoe.arch.base import GGUFMeta
    from edgemoe.arch.deepseek import DeepSeek

    with edgemoe.load(deepseek("v2-lite")) as m:
        spec = m.spec
    dk = spec.qk_nope_dim + spec.head_dim
    spec = dataclasses.replace(
        spec, rope_attn_factor=cos_sin, attn_scale=softmax / dk**0.5
    )
    fields = DeepSeek.gguf_fields(spec)
    key = "rope.scaling.yarn_log_multiplier"
    assert (key in fields) == (softmax != cos_sin**2)
    meta = GGUFMeta("deepseek2", {f"deepseek2.{k}": v for k, v in fields.items()}, "f")
    back = DeepSeek.spec_from_gguf(meta)
    assert back.rope_attn_factor == pytest.approx(cos_sin, rel=1e-7)
    assert back.attn_scale == pytest.approx(spec.attn_scale, rel=1e-7)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("expert_gating_func", 3, "expert_gating_func 3 (1 softmax or 2 sigmoid)"),
        ("attention.key_length", 99, "attention.key_length is 99, expected 40"),
        ("attention.key_length_mla", 8, "key_length_mla 8 must exceed"),
        ("rope.scaling.yarn_log_multiplier", -5.0, "yarn_log_multiplier -5.0"),
        ("rope.scaling.factor", 1.0, "rope.scaling.factor 1.0 (YaRN needs > 1)"),
        ("expert_weights_norm", 2, "expert_weights_norm must be true or false"),
        ("rope.scaling.type", "linear", "rope.scaling.type 'linear'"),
    ],
)
def test_bad_deepseek2_metadata_is_one_clear_error(
    deepseek, tmp_path, key, value, needle
):
    """A deepseek2 GGUF with inconsistent metadata: one ModelFileError naming
    the file, the key and the value, before any tensor is used."""
    import gguf

    from edgemoe.errors import ModelFileError

    src = export_gguf(deepseek("v2-lite"), tmp_path / "m.gguf", "F32")
    reader = gguf.GGUFReader(src)
    bad = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(bad, "deepseek2")
    full = f"deepseek2.{key}"
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name != full:
            writer.add_key_value(
                name,
                field.contents(),
                field.types[0],
                field.types[-1] if len(field.types) > 1 else None,
            )
    kind = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32}
    writer.add_key_value(full, value, kind.get(type(value), gguf.GGUFValueType.UINT32))
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError) as info:
        edgemoe.load(bad)
    msg = str(info.value)
    assert needle in msg and str(bad) in msg and "\n" not in msg, msg
