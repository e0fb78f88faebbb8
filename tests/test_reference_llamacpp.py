"""EdgeMoE against llama.cpp on GGUF files written by our own writer."""

from __future__ import annotations

import numpy as np
import pytest
from refs import export_gguf as export

import edgemoe
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
            cache[family, qtype] = export(tiny_model(family), out, qtype)
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


def test_batched_decode_matches_llamacpp_batched(exported):
    """Four sequences of different lengths prefilled in one step, then three
    steps of one token each, against llama.cpp decoding the same batches
    with a sequence id per token: each sequence's logits at every step."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 384, n).tolist() for n in (5, 17, 3, 30)]
    nexts = [rng.integers(1, 384, 3).tolist() for _ in prompts]
    path = exported("qwen3_moe", "Q8_0")
    with LlamaCpp(path, n_ctx=256, f32_cache=True, n_seq_max=4) as ref:
        want = [ref.decode_batch([(i, 0, p) for i, p in enumerate(prompts)])]
        for k in range(3):
            step = [
                (i, len(p) + k, [n[k]]) for i, (p, n) in enumerate(zip(prompts, nexts))
            ]
            want.append(ref.decode_batch(step))
    with edgemoe.load(path, n_ctx=256) as model:
        seqs = [model.new_sequence() for _ in prompts]
        got = [model.decode(list(zip(seqs, prompts)))]
        for k in range(3):
            got.append(model.decode([(s, [n[k]]) for s, n in zip(seqs, nexts)]))
    for step_got, step_want in zip(got, want):
        for ours, theirs in zip(step_got, step_want):
            assert np.abs(ours - theirs).max() < 1e-3


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
    out = export(fixture_dir, tmp_path / "fixture.gguf", "Q8_0")
    text = "import os\nclass Foo(Bar):\n    def __init__(self, x=3.14):  # héllo\n"
    with edgemoe.load(fixture_dir) as hf, edgemoe.load(out) as gg:
        assert gg.tokenize(text) == hf.tokenize(text)
        assert gg.detokenize(hf.tokenize(text)) == text


def llama_quantize(src, dst):
    """``src`` quantized to Q4_K_M by llama.cpp's own llama-quantize."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert (
        llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        == 0
    )
    return dst


def test_kquant_gguf_quantized_by_llamacpp(fixture_dir, tmp_path):
    """K-quants from llama.cpp's own quantizer (Q4_K_M mixes Q4_K, Q6_K, Q8_0):
    EdgeMoE reads them as stored and computes what llama.cpp computes.

    Teacher-forced on llama.cpp's greedy tokens: the same ggml kernels run in
    both, but activations are re-quantized to Q8_K before every K-quant matmul,
    so a last-bit difference in an activation (ggml's fused elementwise ops do
    not round identically in every graph) can move one Q8_K step; the logits
    then differ by a few hundredths, not more, and the argmax agrees wherever
    the top two logits are not nearly tied.
    """
    f16 = export(fixture_dir, tmp_path / "fixture-f16.gguf", "F16")
    q4k = llama_quantize(f16, tmp_path / "fixture-q4_k_m.gguf")
    with edgemoe.load(q4k) as model, LlamaCpp(q4k, n_ctx=128, f32_cache=True) as ref:
        types = {model.checkpoint.info(n)[0] for n in model.checkpoint.names()}
        assert {"Q4_K", "Q6_K", "Q8_0"} <= types
        tokens = model.tokenize("def parse_args(argv):\n    parser = ")
        ours, theirs = model.eval(tokens), ref.eval(tokens)
        agree = 0
        for _ in range(32):
            assert np.abs(ours - theirs).max() < 0.15
            top2 = np.sort(theirs)[-2:]
            if top2[1] - top2[0] > 0.05:
                assert np.argmax(ours) == np.argmax(theirs)
                agree += 1
            tok = int(np.argmax(theirs))
            ours, theirs = model.eval([tok]), ref.eval([tok])
        assert agree >= 28


def test_backbone_quantized_as_llama_quantize(fixture_dir, tmp_path):
    """Without an importance matrix our K-quants are llama-quantize's: every
    tensor both write in the same type has the same bytes (the converter's
    backbone and export-gguf quantize through this path). llama.cpp reads
    our F32 export: from F16, weights below its normal range would differ."""
    from gguf import GGUFReader

    f32 = export(fixture_dir, tmp_path / "f32.gguf", "F32")
    theirs_path = llama_quantize(f32, tmp_path / "theirs.gguf")
    ours = {
        t.name: t
        for t in GGUFReader(export(fixture_dir, tmp_path / "o.gguf", "Q4_K_M")).tensors
    }
    theirs = {t.name: t for t in GGUFReader(theirs_path).tensors}
    same = [
        n
        for n, t in theirs.items()
        if n in ours and ours[n].tensor_type == t.tensor_type and t.tensor_type >= 2
    ]
    kinds = {theirs[n].tensor_type.name for n in same}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds
    for n in same:
        assert np.array_equal(np.asarray(ours[n].data), np.asarray(theirs[n].data)), n
