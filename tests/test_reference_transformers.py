"""EdgeMoE against transformers on tiny models of every supported family."""

from __future__ import annotations

import numpy as np
import pytest

import edgemoe

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]  # conftest.TINY_CONFIGS


def hf_reference(path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # compare a full 32 steps
    return model


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILIES)
def test_logits_match_transformers(tiny_model, family):
    import torch

    path = tiny_model(family)
    ids = np.random.default_rng(1).integers(1, 384, size=24).tolist()
    ref = hf_reference(path)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
    with edgemoe.load(path) as model:
        got = model.logits(ids)
    assert got.shape == expected.shape == (24, 384)
    assert got.dtype == np.float32
    assert np.abs(expected).max() > 1.0, "logits too small to reveal errors"
    assert np.abs(got - expected).max() <= 1e-3


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILIES)
def test_greedy_decode_matches_transformers(tiny_model, family):
    import torch

    path = tiny_model(family)
    ids = np.random.default_rng(2).integers(1, 384, size=24).tolist()
    ref = hf_reference(path)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    expected = out[0, len(ids) :].tolist()
    with edgemoe.load(path) as model:
        got = [
            r.token
            for r in model.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        ]
    assert len(expected) == 32
    assert got == expected


def test_families_differ_in_what_they_test(tiny_model):
    """The tiny configs exercise the per-family features they are meant to."""
    spec = {
        f: edgemoe.load(tiny_model(f)).spec for f in ("qwen2_moe", "qwen3_moe", "olmoe")
    }
    assert spec["qwen2_moe"].moe_layers == (True, False, True)
    assert spec["qwen2_moe"].shared_expert_gated
    assert spec["qwen3_moe"].qk_norm == "head" and spec["qwen3_moe"].head_dim == 32
    assert spec["olmoe"].qk_norm == "full" and spec["olmoe"].clip_qkv == 6.0


def test_sliding_window_matches_transformers(build_model):
    """Mixtral with a window shorter than the prompt: the mask and the cache
    span follow transformers for prefill and for every decode step."""
    import torch

    path = build_model("mixtral", sliding_window=8)
    ids = np.random.default_rng(4).integers(1, 384, size=24).tolist()
    ref = hf_reference(path)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
        out = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    with edgemoe.load(path) as model:
        assert model.spec.sliding_window == 8
        assert np.abs(model.logits(ids) - expected).max() <= 1e-3
        got = [
            r.token
            for r in model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True)
        ]
    assert got == out[0, len(ids) :].tolist()
