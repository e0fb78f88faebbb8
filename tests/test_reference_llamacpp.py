"""EdgeMoE against llama.cpp on GGUF files written by our own writer."""

from __future__ import annotations

import numpy as np
import pytest

import edgemoe
from edgemoe.checkpoint import open_checkpoint
from edgemoe.converters.llama_gguf import write_gguf
from edgemoe.runtime.llamacpp import LlamaCpp

CASES = [
    ("mixtral", "F32"),
    ("mixtral", "Q8_0"),
    ("qwen3_moe", "F32"),
    ("qwen3_moe", "Q8_0"),
]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    cache = {}

    def get(family: str, qtype: str):
        if (family, qtype) not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"{family}-{qtype}.gguf"
            ckpt = open_checkpoint(tiny_model(family))
            try:
                write_gguf(ckpt, out, qtype)
            finally:
                ckpt.close()
            cache[family, qtype] = out
        return cache[family, qtype]

    return get


@pytest.mark.parametrize("family,qtype", CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_greedy_tokens_match_llamacpp(exported, family, qtype):
    path = exported(family, qtype)
    prompt = np.random.default_rng(3).integers(1, 384, size=24).tolist()
    with LlamaCpp(path, n_ctx=128, f32_cache=True) as ref:
        expected, _ = ref.greedy(prompt, 32)
        ref.reset()
        ref_logits = ref.eval(prompt)
    with edgemoe.load(path) as model:
        got = [
            r.token
            for r in model.generate(
                prompt, max_tokens=32, temperature=0, ignore_eos=True
            )
        ]
        ours = model.logits(prompt)[-1]
    assert got == expected
    # Same weights, same ggml kernels: the last-position logits agree closely too.
    assert np.abs(ours - ref_logits).max() < 1e-3


def test_gguf_reader_matches_hf_source(tiny_model, exported):
    """Reading our F32 GGUF (Q/K rows permuted for llama.cpp) gives the HF logits."""
    prompt = list(range(1, 25))
    with (
        edgemoe.load(tiny_model("mixtral")) as hf,
        edgemoe.load(exported("mixtral", "F32")) as gg,
    ):
        assert gg.spec.rope_interleaved and not hf.spec.rope_interleaved
        assert np.abs(hf.logits(prompt) - gg.logits(prompt)).max() < 1e-4


def test_llamacpp_tokenizes_like_the_hf_tokenizer(fixture_dir, tmp_path):
    """The fixture's byte-level BPE survives export: llama.cpp splits text as
    the HF tokenizer does."""
    out = tmp_path / "fixture.gguf"
    ckpt = open_checkpoint(fixture_dir)
    try:
        write_gguf(ckpt, out, "Q8_0")
    finally:
        ckpt.close()
    text = "import os\nclass Foo(Bar):\n    def __init__(self, x=3.14):  # héllo\n"
    with edgemoe.load(fixture_dir) as hf, edgemoe.load(out) as gg:
        assert gg.tokenize(text) == hf.tokenize(text)
        assert gg.detokenize(hf.tokenize(text)) == text
