"""The whole-step engine (runtime/step.py): graph computes per step, a long
context against transformers, batched decode of several sequences against
each decoded alone, and the typed errors around sequences."""

from __future__ import annotations

import numpy as np
import pytest
from test_reference_transformers import FAMILIES, hf_reference

import edgemoe
from edgemoe.errors import ConfigError, ContextOverflowError, EdgeMoEError

RNG = np.random.default_rng(12)


def computes_per_decode(model, steps: int = 4) -> list[int]:
    out = []
    for tok in RNG.integers(1, 384, steps).tolist():
        before = model.step.computes
        model.eval([tok])
        out.append(model.step.computes - before)
    return out


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILIES)
def test_one_graph_per_step_with_every_expert_in_memory(tiny_model, family):
    with edgemoe.load(tiny_model(family)) as m:
        before = m.step.computes
        m.eval(RNG.integers(1, 384, 40).tolist())  # one prefill step (n_batch 256)
        assert m.step.computes - before == 1
        assert computes_per_decode(m) == [1, 1, 1, 1]


def host_routed(m) -> None:
    """Move a model in memory to the host-routed path (a split per MoE layer),
    same policy: what a budget or thresholds would run."""
    m.routed.resident = False
    m._rebuild_step()


def test_converted_model_graph_counts(converted_fixture):
    """In memory at a forced level or a preset the experts run inside the one
    graph; thresholds and a budget stop at each MoE layer's router, once."""
    n_moe = 4  # the fixture: 4 layers, all MoE
    prompt = RNG.integers(1, 1000, 20).tolist()
    with edgemoe.load(converted_fixture, n_ctx=128, force_level=4) as m:
        assert sum(m.spec.moe_layers) == n_moe
        m.eval(prompt)
        assert computes_per_decode(m) == [1] * 4
        resident = m.logits(prompt)
    with edgemoe.load(converted_fixture, n_ctx=128) as m:  # the default preset
        m.eval(prompt)
        assert computes_per_decode(m) == [1] * 4
        m.set_quality((0.6, 0.9))  # HOBBIT's thresholds: decided on the host
        m.eval(prompt[:3])
        assert computes_per_decode(m) == [1 + n_moe] * 4
    from test_budget_floor import reported_minimum

    opts = dict(n_ctx=128, force_level=4)
    budget = reported_minimum(converted_fixture, **opts) + (4 << 20)
    with edgemoe.load(converted_fixture, budget=budget, **opts) as m:
        m.eval(prompt)
        assert max(computes_per_decode(m, 8)) <= 1 + n_moe
        # The same level computed from host-placed slots: the same logits up
        # to ggml's rounding of activations to Q8_K before each K-quant
        # matmul. The slot pools and the resident tensors run through
        # different kernels, so a row's activation can differ in its last
        # bit and move one Q8_K step; that row's logits, and the later rows
        # attending to it, then differ by a few hundredths (about a third
        # of random 20-token prompts on the fixture), never more.
        ours = m.logits(prompt)
        assert np.abs(ours - resident).max() < 0.15
        top2 = np.sort(resident, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.05
        assert (ours.argmax(1) == resident.argmax(1))[clear].all()


def test_a_budget_that_holds_the_policys_planes_runs_as_in_memory(converted_fixture):
    """A budget holding every plane the policy runs keeps just those planes
    resident (balanced: planes 1 and 2), so steps run as one graph with the
    in-memory logits; a quality that needs a plane it left on disk is
    refused with the levels named; a byte less and the planes stream."""
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.runtime.offload import resident_budget

    opts = dict(n_ctx=128, n_batch=32)
    prompt = RNG.integers(1, 1000, 24).tolist()
    ckpt = open_checkpoint(converted_fixture)
    try:
        budget = resident_budget(ckpt, **opts)
    finally:
        ckpt.close()
    with edgemoe.load(converted_fixture, **opts) as m:
        expected = m.logits(prompt)
    with edgemoe.load(converted_fixture, budget=budget, **opts) as m:
        assert m.memory.resident and m.routed.cache.n_planes == 2
        assert m.memory.slots[2] == 0 and m.memory.total <= budget
        np.testing.assert_allclose(m.logits(prompt), expected, rtol=0, atol=1e-5)
        assert computes_per_decode(m) == [1] * 4
        assert m.counters()["resident"][2] == 0
        m.set_quality("fast")
        with pytest.raises(ConfigError, match="level 8, but this budget loaded"):
            m.set_quality("max")
        assert m.options.quality == "fast"
    with edgemoe.load(converted_fixture, budget=budget - 1, **opts) as m:
        assert not m.memory.resident and m.step.router is not None


def test_float16_kv_cache(converted_fixture):
    """kv_type="f16" (llama.cpp's default cache) halves the cache and what a
    budget counts for it; the logits move (K, V and the query are rounded to
    float16; the Q4_K backbone's 8-bit activations amplify it: up to ~1.2 of
    logits ~10 on the fixture) with the same top tokens, and a type that is
    not offered is refused."""
    opts = dict(n_ctx=256, n_batch=32, force_level=4)
    text = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n"
    out = {}
    for kv in ("f32", "f16"):
        with edgemoe.load(converted_fixture, kv_type=kv, **opts) as m:
            ids = m.tokenize(text)
            out[kv] = (m.logits(ids), m.cache.nbytes, m.memory.kv_cache)
    (a, na, pa), (b, nb, pb) = out["f32"], out["f16"]
    assert nb * 2 == na and pb * 2 == pa
    assert 0 < np.abs(a - b).max() < 0.2 * np.abs(a).max()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    with pytest.raises(ConfigError, match="kv_type must be"):
        edgemoe.load(converted_fixture, kv_type="q8_0", n_ctx=128)


@pytest.mark.parametrize("quality", ["balanced", "high", "fast"])
def test_presets_in_the_graph_equal_the_host_path(converted_fixture, quality):
    """A preset's levels by rank, computed inside the step graph (views of the
    layer's slots, protected experts through the zero-slot table), give the
    logits the host-routed path computes from slot ids, and they differ from
    every forced level (the mix is real)."""
    presets_in_graph_equal_host_path(
        converted_fixture, quality, RNG.integers(1, 1000, 24).tolist()
    )


def presets_in_graph_equal_host_path(path, quality: str, prompt: list[int]) -> None:
    with edgemoe.load(path, n_ctx=128, quality=quality) as m:
        assert m.routed.resident
        graph = m.logits(prompt)
        host_routed(m)
        assert m.step.splits
        np.testing.assert_allclose(m.logits(prompt), graph, rtol=0, atol=1e-5)
    for level in (2, 4, 8):
        with edgemoe.load(path, n_ctx=128, force_level=level) as m:
            assert np.abs(m.logits(prompt) - graph).max() > 1e-3


def buffer_type(t) -> bytes:
    from edgemoe.ggml_binding import TensorMirror, lib

    g = lib()
    buf = TensorMirror.from_address(t.ptr).buffer
    return g.ggml_backend_buft_name(g.ggml_backend_buffer_get_type(buf))


@pytest.mark.parametrize("budget", [False, True], ids=["in-memory", "budget"])
def test_slots_in_the_backends_own_buffer_compute_the_same(converted_fixture, budget):
    """Expert planes in the CPU backend's own buffer type (as a GPU's would
    be: no host array behind them), written through ggml_backend_tensor_set,
    give the logits of the zero-copy host slabs the I/O threads fill: in
    memory, the per-layer resident tensors (unrepacked: ggml's repacked
    kernels round differently, in llama.cpp too) against slabs streamed under
    a budget a byte short of holding them all; under a small budget, streamed
    slots (each read landing at its slot's offset, evicted and rewritten)
    against those slabs. By default the resident planes are repacked where
    this CPU repacks their type."""
    from test_budget_floor import reported_minimum

    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.ggml_binding import TensorMirror
    from edgemoe.runtime.offload import resident_budget

    opts = dict(n_ctx=128, force_level=8)
    with edgemoe.load(converted_fixture, **opts) as m:
        # ggml repacks a type only where this CPU has its kernels (CI's
        # machine may not): repacked wherever it can be.
        for t in m.routed.cache.tensors_for(0)[0]:
            can = m.device.repacks(TensorMirror.from_address(t.ptr).type)
            assert buffer_type(t) == (b"CPU_REPACK" if can else b"CPU")
    if budget:
        opts["budget"] = reported_minimum(converted_fixture, **opts) + (1 << 20)
    else:
        ckpt = open_checkpoint(converted_fixture)
        try:
            short = resident_budget(ckpt, 128, 256, force_level=8) - 1
        finally:
            ckpt.close()
    prompt = RNG.integers(1, 1000, 40).tolist()
    # In memory the other side is unrepacked throughout: so is this one.
    slabs = dict(opts, budget=short, repack=False) if not budget else opts
    with edgemoe.load(converted_fixture, **slabs) as m:
        assert m.routed.cache.store == "host"
        expected = m.logits(prompt)
        kinds = {buffer_type(t) for t in m.routed.cache.tensors_for(0)[0]}
        assert kinds == {b"CPU_Mapped"}
    other = dict(slot_store="device") if budget else dict(repack=False)
    with edgemoe.load(converted_fixture, **other, **opts) as m:
        cache = m.routed.cache
        assert cache.store == ("device" if budget else "resident")
        assert {buffer_type(t) for t in cache.tensors_for(0)[0]} == {b"CPU"}
        np.testing.assert_allclose(m.logits(prompt), expected, rtol=0, atol=1e-5)
        if budget:
            assert not any(cache.slabs) and cache.counters.evictions > 0
    with pytest.raises(ConfigError, match="slot_store must be"):
        edgemoe.load(converted_fixture, slot_store="gpu", n_ctx=128)


@pytest.mark.parametrize("window", [None, 512], ids=["full", "sliding"])
def test_long_context_matches_transformers(build_model, window):
    """A 2,048-token prompt (8 prefill steps of 256 over a growing cache):
    the last positions within 1e-3 of transformers."""
    import torch

    extra = {"sliding_window": window} if window else {}
    path = build_model("mixtral", max_position_embeddings=4096, **extra)
    ids = RNG.integers(1, 384, 2048).tolist()
    ref = hf_reference(path)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0, -16:].numpy()
    with edgemoe.load(path, n_ctx=2048) as m:
        assert m.spec.sliding_window == window
        got = m.logits(ids)[-16:]
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() <= 1e-3


def test_batched_decode_equals_each_sequence_alone(tiny_model):
    """Four sequences of different lengths, prefilled in one step and decoded
    in one graph per token, give each sequence's logits as decoded alone."""
    path = tiny_model("qwen3_moe")
    prompts = [RNG.integers(1, 384, n).tolist() for n in (5, 17, 3, 30)]
    nexts = [RNG.integers(1, 384, 3).tolist() for _ in prompts]
    with edgemoe.load(path, n_ctx=256) as m:
        alone = []
        for prompt, nxt in zip(prompts, nexts):
            m.reset()
            rows = [m.eval(prompt)] + [m.eval([t]) for t in nxt]
            alone.append(np.stack(rows))
        m.reset()
        seqs = [m.new_sequence() for _ in prompts]
        rows = [m.decode(list(zip(seqs, prompts)))]
        before = m.step.computes
        for i in range(3):
            rows.append(m.decode([(s, [nxt[i]]) for s, nxt in zip(seqs, nexts)]))
        assert m.step.computes - before == 3  # one graph per batched step
        for j, seq in enumerate(seqs):
            got = np.stack([r[j] for r in rows])
            np.testing.assert_allclose(got, alone[j], rtol=0, atol=1e-4)
            m.free_sequence(seq)


def test_sequence_errors_are_typed(tiny_model):
    with edgemoe.load(tiny_model("mixtral"), n_ctx=64) as m:
        a, b = m.new_sequence(), m.new_sequence()
        with pytest.raises(ConfigError, match="sequence 999 does not exist"):
            m.decode([(999, [1])])
        with pytest.raises(ConfigError, match="sequence 'x' does not exist"):
            m.free_sequence("x")
        with pytest.raises(ConfigError, match="outside the vocabulary"):
            m.decode([(a, [1, 384])])
        with pytest.raises(ConfigError, match="appears twice"):
            m.decode([(a, [1]), (a, [2])])
        with pytest.raises(ConfigError, match="own sequence"):
            m.free_sequence(m.seq.id)
        m.decode([(a, list(range(1, 51)))])
        with pytest.raises(ContextOverflowError, match="free cells"):
            m.decode([(b, list(range(1, 21)))])  # 50 + 20 > 64 cells
        assert m.cache.get(b).n_past == 0  # nothing of the failed step stays
        m.free_sequence(a)
        m.decode([(b, list(range(1, 21)))])  # a's cells are free again
        with pytest.raises(ContextOverflowError):
            m.decode([(b, list(range(1, 50)))])  # past the context of 64


def test_a_device_that_is_not_there_is_a_typed_error(tiny_model):
    with pytest.raises(EdgeMoEError, match="no ggml gpu device"):
        edgemoe.load(tiny_model("mixtral"), device="gpu")
