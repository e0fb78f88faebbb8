"""gpt-oss against transformers: windowed and full layers with attention
sinks, YaRN RoPE, the router's bias and top-k softmax, expert biases and the
clamped SwiGLU, in two configurations; prompts short, past the window, and
past YaRN's original context."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_CONFIGS
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

YARN = TINY_CONFIGS["gpt_oss"]["rope_parameters"]
CONFIGS = {
    # conftest's: windowed first, YaRN unrounded, limit 2 (clamps bite).
    "alternating": {},
    # Full, windowed, full; plain RoPE; top-3 of 4; the default clamp.
    "full-first": dict(
        num_hidden_layers=3,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        num_experts_per_tok=3,
        swiglu_limit=7.0,
        sliding_window=16,
    ),
    # What llama.cpp's gpt-oss graph computes: YaRN's range rounded, limit 7.
    "llama": dict(rope_parameters={**YARN, "truncate": True}, swiglu_limit=7.0),
}


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from conftest import build_tiny

    made = {}

    def get(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp(f"gpt-oss-{name}")
            made[name] = build_tiny(
                "gpt_oss", out, max_position_embeddings=1024, **CONFIGS[name]
            )
        return made[name]

    return get


def reference(path):
    from test_reference_transformers import hf_reference

    return hf_reference(path)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(gpt_oss, name):
    assert_logits_match(gpt_oss(name), 32, seed=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_decode_matches_transformers(gpt_oss, name):
    assert_greedy_matches(gpt_oss(name), seed=2)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_600_token_prompt_matches_transformers(gpt_oss, name):
    """Past the window and YaRN's original context (64): every position's
    logits, prefilled in ubatches."""
    assert_logits_match(gpt_oss(name), 600, seed=3, n_ctx=1024)


def test_the_configurations_exercise_the_quirks(gpt_oss):
    with (
        edgemoe.load(gpt_oss("alternating")) as ma,
        edgemoe.load(gpt_oss("full-first")) as mb,
    ):
        a, b = ma.spec, mb.spec
    assert a.swa_layers == (True, False) and b.swa_layers == (False, True, False)
    assert a.rope_scaling == "yarn" and not a.rope_truncate and b.rope_scaling is None
    assert (a.swiglu_limit, b.swiglu_limit) == (2.0, 7.0)
    assert a.moe_bias and a.ffn_act == "swiglu_oai"


@pytest.mark.llama
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_our_gguf_matches_llamacpp_and_transformers(gpt_oss, tmp_path, qtype):
    """Our GGUF in llama.cpp: 32 greedy tokens and the logits at every prompt
    position agree with EdgeMoE on the same file; EdgeMoE on the float file
    agrees with transformers on the HF original (so a metadata mistake
    written and read back the same way cannot pass)."""

    src = gpt_oss("llama")
    path = export_gguf(src, tmp_path / f"gpt-oss-{qtype}.gguf", qtype)
    prompt = np.random.default_rng(6).integers(1, 384, size=32).tolist()
    ours, spec = assert_gguf_matches_llamacpp(path, prompt)
    assert spec.swa_layers == (True, False)
    if qtype == "F32":
        hf = transformers_logits(src, prompt)
        assert np.abs(ours - hf).max() <= 1e-3


def test_export_refuses_what_llamacpp_cannot_compute(gpt_oss, tmp_path):
    """llama.cpp's gpt-oss graph fixes the SwiGLU clamp at 7: a model with
    another limit is refused by name, and nothing is written."""
    from edgemoe.errors import ConfigError

    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match=r"swiglu_limit=2\.0 \(llama.cpp: 7\.0\)"):
        export_gguf(gpt_oss("alternating"), out, "F32")
    assert not out.exists()


def mxfp4_pair(model_dir, out_mx, out_deq):
    """The model's experts quantized to MXFP4 in the published checkpoints'
    layout (``out_mx``), and the same model with those experts dequantized
    back to float32 for transformers (``out_deq``)."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from edgemoe.quant import mxfp4

    tensors = load_file(str(model_dir / "model.safetensors"))
    mx, deq = {}, {}
    for name, w in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.quantize_hf(w.transpose(0, 2, 1))  # rows [E, N, K]
            mx[name + "_blocks"], mx[name + "_scales"] = blocks, scales
            deq[name] = np.ascontiguousarray(
                mxfp4.dequantize_hf(blocks, scales).transpose(0, 2, 1)
            )
        else:
            mx[name] = deq[name] = w
    for out, t in ((out_mx, mx), (out_deq, deq)):
        shutil.copytree(model_dir, out)
        (out / "model.safetensors").unlink()
        save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out_mx / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (out_mx / "config.json").write_text(json.dumps(cfg))
    return out_mx, out_deq


def test_mxfp4_layout_is_transformers_own():
    """Our MXFP4 codec against transformers' dequantizer: the nibble order
    and the scale's exponent bias."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from edgemoe.quant import mxfp4

    w = np.random.default_rng(7).standard_normal((2, 8, 64)).astype(np.float32)
    blocks, scales = mxfp4.quantize_hf(w)  # [2, 8, 2, 16], [2, 8, 2]
    ref = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    )  # [2, 64, 8]: transposed for x @ W
    np.testing.assert_array_equal(
        mxfp4.dequantize_hf(blocks, scales), ref.numpy().transpose(0, 2, 1)
    )
    assert np.abs(mxfp4.dequantize_hf(blocks, scales) - w).max() < 0.5 * np.abs(w).max()


def test_mxfp4_experts_run_as_stored(gpt_oss, tmp_path):
    """A checkpoint with MXFP4 experts (quantized here from the tiny model)
    runs them as ggml MXFP4. ggml multiplies MXFP4 by activations rounded to
    Q8_0 (its CPU kernels' pairing, llama.cpp's too), so against transformers
    on the dequantized weights the logits agree to a relative error of about
    2%, where a wrong nibble order or row split gives over 50%; against
    llama.cpp on our GGUF of it (experts kept MXFP4) they agree to 1e-3 at
    every position, and 32 greedy tokens are the same."""
    import torch

    from edgemoe.checkpoint.base import GGML_MXFP4
    from edgemoe.runtime.llamacpp import LlamaCpp

    src = gpt_oss("llama")
    mx, deq = mxfp4_pair(src, tmp_path / "mx", tmp_path / "deq")
    ids = np.random.default_rng(8).integers(1, 384, size=32).tolist()
    ref = reference(deq)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
    with edgemoe.load(mx) as model:
        assert model.checkpoint.load("blk.0.ffn_up_exps.weight").qtype == GGML_MXFP4
        got = model.logits(ids)
    rel = np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean())
    assert rel < 0.05, rel
    gguf = export_gguf(mx, tmp_path / "mx.gguf", "F32")
    with LlamaCpp(gguf, n_ctx=256, f32_cache=True) as lc:
        want, _ = lc.greedy(ids, 32)
        lc.reset()
        ref_logits = np.stack([lc.eval([t]) for t in ids])  # [T, V]
    with edgemoe.load(gguf) as model:
        assert model.checkpoint.load("blk.1.ffn_down_exps.weight").qtype == GGML_MXFP4
        assert np.abs(model.logits(ids) - ref_logits).max() < 1e-3
        assert np.abs(model.logits(ids) - got).max() < 1e-4  # the same model
        tokens = [
            r.token
            for r in model.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        ]
    assert tokens == want


def test_mxfp4_checkpoint_converts_to_the_planes_of_its_dequantized_weights(
    convertible, tmp_path
):
    """Converting MXFP4 experts fits the planes to the dequantized weights:
    the expert shards equal those converted from the dequantized checkpoint,
    byte for byte, and level 8 follows transformers on it (the perplexity
    cost against running MXFP4 as stored: benchmarks/bench_mxfp4.py)."""
    from edgemoe.converters.convert import ConvertOptions, convert

    mx, deq = mxfp4_pair(convertible, tmp_path / "mx", tmp_path / "deq")
    opts = ConvertOptions(calib_tokens=512, backbone_type="F32")
    a = convert(mx, tmp_path / "mx-edge", opts).out
    b = convert(deq, tmp_path / "deq-edge", opts).out
    shards = sorted(p.name for p in a.glob("experts-*.gguf"))
    assert shards and shards == sorted(p.name for p in b.glob("experts-*.gguf"))
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ids = np.random.default_rng(16).integers(1, 384, size=32).tolist()
    r8, _, _ = level_errors(a, transformers_logits(deq, ids), ids)
    assert r8 < 0.1, r8


def test_mxfp4_scales_missing_is_one_clear_error(gpt_oss, tmp_path):
    from safetensors.numpy import load_file, save_file

    from edgemoe.errors import ModelFileError

    mx, _ = mxfp4_pair(gpt_oss("alternating"), tmp_path / "mx", tmp_path / "deq")
    path = mx / "model.safetensors"
    t = load_file(str(path))
    del t["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(t, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelFileError) as info:
        edgemoe.load(mx)
    msg = str(info.value)
    assert "model.layers.1.mlp.experts.down_proj_scales" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def convertible(tmp_path_factory):
    """The alternating model (sinks, YaRN, clamp 2). Its hidden size and FFN
    (64) are padded to the planes' 256-weight blocks, as gpt-oss-20b's 2,880
    is to 3,072: the runtime pads the activations."""
    from conftest import build_tiny

    out = tmp_path_factory.mktemp("gpt-oss-64")
    return build_tiny("gpt_oss", out, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def converted(convertible, tmp_path_factory):
    from edgemoe.converters.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("gpt-oss-edge") / "edge"
    # A float backbone: what differs from transformers is the planes alone.
    convert(convertible, out, ConvertOptions(calib_tokens=512, backbone_type="F32"))
    return out


def test_converted_model_follows_transformers(convertible, converted):
    """Level 8 in memory (planes summing to about 8 bits) stays within 10% of
    the float model (2-6% on these random prompts; a plane or bias out of
    line gives tens of percent), and each lower level is further away."""
    ids = np.random.default_rng(9).integers(1, 384, size=32).tolist()
    r8, r4, r2 = level_errors(converted, transformers_logits(convertible, ids), ids)
    assert r8 < 0.1 and r8 < r4 < r2, (r8, r4, r2)


def test_conversion_reads_each_stacked_expert_tensor_once_per_layer(
    convertible, tmp_path, monkeypatch
):
    """gpt-oss stores a layer's experts stacked in one tensor: converting,
    which reads experts one at a time, cuts them from one read per tensor
    and layer, not one per expert."""
    from edgemoe.checkpoint.hf import HFCheckpoint
    from edgemoe.converters.convert import ConvertOptions, convert

    reads = []
    load = HFCheckpoint.load

    def counted(self, name):
        if name.endswith("_exps.weight"):
            reads.append(name)
        return load(self, name)

    monkeypatch.setattr(HFCheckpoint, "load", counted)
    convert(convertible, tmp_path / "edge", ConvertOptions(calib_tokens=512))
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2 * 3  # layers x 3


def test_converted_model_under_a_quarter_budget_is_lossless(converted):
    """Streaming a quarter of the experts at a time, the host-placed graphs
    (expert biases by the slot order's expert ids) give the in-memory logits
    and the same 32 greedy tokens."""
    ids = np.random.default_rng(10).integers(1, 384, size=24).tolist()
    assert_quarter_budget_lossless(converted, ids)


def test_synth_preset_writes_what_transformers_reads(tmp_path):
    """The gpt-oss-20b preset (narrowed) written as HF: gate and up
    interleaved back into one transposed gate_up_proj; transformers loads it
    and EdgeMoE computes the same logits."""

    from edgemoe.converters.synth import preset_config, write_hf

    cfg = preset_config(
        "gpt-oss-20b", 2, hidden_size=64, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        vocab_size=384, head_dim=16,
    )  # fmt: skip
    path = write_hf(cfg, tmp_path / "oss")
    ids = np.random.default_rng(11).integers(1, 384, size=32).tolist()
    expected = transformers_logits(path, ids)
    with edgemoe.load(path) as model:
        assert model.spec.rope_scaling == "yarn" and not model.spec.rope_truncate
        got = model.logits(ids)
    assert np.abs(got - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("quality", ["balanced", "fast"])
def test_presets_in_the_graph_equal_the_host_path(converted, quality):
    """Dual routing's mixed levels with expert biases and the clamped SwiGLU:
    the in-graph path (views of the slots by rank, biases by expert id) and
    the host-routed path (slot ids, biases by the slot order's expert ids)
    give the same logits, unlike any forced level."""
    from test_step import presets_in_graph_equal_host_path

    prompt = np.random.default_rng(12).integers(1, 384, size=24).tolist()
    presets_in_graph_equal_host_path(converted, quality, prompt)


def test_inspect_names_the_windows_sinks_and_yarn(gpt_oss, capsys):
    from test_cli import run_main

    out, _ = run_main(capsys, "inspect", gpt_oss("alternating"))
    assert "window 8 on 1 of 2 layers · attention sinks · YaRN ×4" in out
