"""Float references for what ggml computes (imported by tests, not a test)."""

from __future__ import annotations

import math

import numpy as np


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX, where llama.cpp's extra buffer types (its
    defaults) crash on MoE GGUFs (shared/docs/engine.md §8)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " amx_tile" in line for line in fh)
    except OSError:
        return False


def q8(x: np.ndarray, block: int) -> np.ndarray:
    """ggml's activation quantization (Q8_K per 256 / Q8_0 per 32), dequantized."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], block):
            v = x[r, b : b + block]
            if block == 256:  # quantize_row_q8_K_ref: scale from the signed max
                m = v[np.argmax(np.abs(v))]
                iscale = np.float32(-127.0) / m
                q = np.minimum(np.trunc(iscale * v + np.copysign(0.5, iscale * v)), 127)
                out[r, b : b + block] = q * (np.float32(1.0) / iscale)
            else:  # quantize_row_q8_0_ref
                d = np.float32(np.abs(v).max() / 127.0)
                d16 = np.float32(np.float16(d))
                q = np.round(v / d) if d else np.zeros_like(v)
                out[r, b : b + block] = q * d16
    return out


def transformers_perplexity(path, text_path, window=256):
    """The same windows as edgemoe.runtime.perplexity, computed by transformers."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    ids = (
        Tokenizer.from_file(str(path / "tokenizer.json"))
        .encode(text_path.read_text(encoding="utf-8"), add_special_tokens=False)
        .ids
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=chunk).logits[0].double(), -1)
        total -= logp[:-1].gather(1, chunk[0, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
    return math.exp(total / count), count


def transformers_logits(path, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits [T, V] for ``ids`` on the model at ``path``."""
    import torch
    from test_reference_transformers import hf_reference

    with torch.no_grad():
        return hf_reference(path)(input_ids=torch.tensor([ids])).logits[0].numpy()


def assert_logits_match(path, n: int, seed: int, **load) -> None:
    """EdgeMoE's logits at every position of a random ``n``-token prompt
    within 1e-3 of transformers' (and large enough to reveal errors)."""
    import edgemoe

    ids = np.random.default_rng(seed).integers(1, 384, size=n).tolist()
    expected = transformers_logits(path, ids)
    with edgemoe.load(path, **load) as model:
        got = model.logits(ids)
    assert np.abs(expected).max() > 1.0, "logits too small to reveal errors"
    assert np.abs(got - expected).max() <= 1e-3


def assert_greedy_matches(path, seed: int, n_prompt: int = 32, n: int = 32) -> None:
    """``n`` greedy tokens after a random prompt, the same as transformers'."""
    import torch
    from test_reference_transformers import hf_reference

    import edgemoe

    ids = np.random.default_rng(seed).integers(1, 384, size=n_prompt).tolist()
    with torch.no_grad():
        out = hf_reference(path).generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False
        )
    with edgemoe.load(path) as model:
        got = [
            r.token
            for r in model.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)
        ]
    assert got == out[0, len(ids) :].tolist()


def export_gguf(src, out, qtype: str):
    """``src`` (HF) written as a llama.cpp GGUF of ``qtype`` at ``out``."""
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.converters.llama_gguf import write_gguf

    ckpt = open_checkpoint(src)
    try:
        return write_gguf(ckpt, out, qtype)
    finally:
        ckpt.close()


def assert_gguf_matches_llamacpp(path, prompt: list[int], rel: bool = False):
    """llama.cpp and EdgeMoE on the same GGUF: 32 identical greedy tokens and
    the logits at every prompt position within 1e-3 (times the largest logit
    if ``rel``). Returns EdgeMoE's logits [T, V] and its spec."""
    import edgemoe
    from edgemoe.runtime.llamacpp import LlamaCpp

    with LlamaCpp(path, n_ctx=256, f32_cache=True) as ref:
        expected, _ = ref.greedy(prompt, 32)
        ref.reset()
        ref_logits = np.stack([ref.eval([t]) for t in prompt])  # [T, V]
    with edgemoe.load(path) as model:
        got = [
            r.token
            for r in model.generate(
                prompt, max_tokens=32, temperature=0, ignore_eos=True
            )
        ]
        ours = model.logits(prompt)
        spec = model.spec
    assert got == expected
    tol = 1e-3 * (max(1.0, np.abs(ref_logits).max()) if rel else 1.0)
    assert np.abs(ours - ref_logits).max() < tol
    return ours, spec


def level_errors(path, expected: np.ndarray, ids: list[int]) -> list[float]:
    """Relative RMS error of a converted model's logits at levels 8, 4, 2
    against ``expected`` (the float model's, [T, V])."""
    import edgemoe

    out = []
    for level in (8, 4, 2):
        with edgemoe.load(path, force_level=level) as model:
            got = model.logits(ids)
        out.append(
            float(np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean()))
        )
    return out


def assert_quarter_budget_lossless(path, ids: list[int]) -> int:
    """Streaming a quarter of the experts at a time, level 8 gives the
    in-memory logits (1e-5: experts batched onto the residual in turn) and
    the same 32 greedy tokens, and really evicts. Returns the streamed
    model's KV cache bytes at n_ctx 256."""
    from test_offload import quarter_budget

    import edgemoe

    small = dict(n_ctx=256, n_batch=32, force_level=8, repack=False)
    with edgemoe.load(path, **small) as m:
        expected_logits = m.logits(ids)
        expected = [
            r.token
            for r in m.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        ]
    with edgemoe.load(path, budget=quarter_budget(path), **small) as m:
        assert np.abs(m.logits(ids) - expected_logits).max() <= 1e-5
        got = [
            r.token
            for r in m.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        ]
        assert m.routed.cache.counters.evictions > 0  # it really streamed
        kv_bytes = m.cache.nbytes
    assert got == expected
    return kv_bytes
