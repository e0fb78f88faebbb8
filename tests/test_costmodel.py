"""The cost model against decode times measured on this machine.

Each byte term is checked against a measured time difference between two
configurations that differ only in that term: the expert term between forced
levels 8 and 2 of one model, the backbone term between two models that differ
only in their output head. Then the whole prediction, with this machine's
matvec rates (sampled in the same rounds as the decodes) and its per-token
and per-plane overheads measured on a tiny
model of the same depth, against a dual-routing decode of the larger model.
The bounds (±40%) allow this shared machine's noise; a term off by 2x or 3x
(the backbone counted twice, the expert rate a third) falls outside them.
"""

from __future__ import annotations

import dataclasses

import pytest

LAYERS = 4
ROUNDS = 9
N_GEN = 16
SHAPES = {
    # name: (hidden, expert FFN, vocabulary); Mixtral, 8 experts, top-2.
    "tiny": (256, 256, 1024),
    "big": (1024, 1024, 1024),
    "bighead": (1024, 1024, 65536),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The three models converted (levels 2,4,8), random weights."""
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.converters.synth import preset_config, write_hf

    root = tmp_path_factory.mktemp("costmodel")
    out = {}
    for name, (hidden, ffn, vocab) in SHAPES.items():
        cfg = preset_config(
            "demo", LAYERS, hidden_size=hidden, intermediate_size=ffn,
            vocab_size=vocab, num_attention_heads=8, num_key_value_heads=4,
        )  # fmt: skip
        hf = write_hf(cfg, root / f"{name}-hf")
        out[name] = root / name
        convert(hf, out[name], ConvertOptions(calib_tokens=512, calib_window=256))
    return out


RATE_TYPES = (("q8_0", "Q8_0"), ("q4_k", "Q4_K"), ("q2_k", "Q2_K"), ("q6_k", "Q6_K"))


@pytest.fixture(scope="module")
def probes():
    """This machine's ggml matvec probes at one thread (the decodes below run
    one thread), at the big model's shapes and working set (all its experts):
    where a cache holds these small models (480 MiB of L3 on one machine
    here), their bytes come from it, and so do the rates'."""
    from edgemoe.runtime.measure import MatmulProbe

    hidden, ffn, _ = SHAPES["big"]
    shape = dict(ffn=ffn, dim=hidden, experts=LAYERS * 8, used=2)
    made = {}
    try:
        for name, t in RATE_TYPES:
            made[name] = MatmulProbe(t, 1, **shape)
        yield made
    finally:
        for p in made.values():
            p.close()


def measure(runs: dict, probes: dict):
    """ms per decoded token of each loaded model, and a profile of the
    matvec rates alone (no overheads, no storage: the byte terms), sampled in
    the same interleaved rounds: the fastest of each, so that drift and the
    machine's other load hit decodes and rates alike (rates measured once,
    apart from the decodes, missed them by more than the bounds in a busy
    spell)."""
    from edgemoe.profile import load_profile
    from edgemoe.runtime.bench import bench

    samples: dict = {k: [] for k in runs}
    rates: dict = {k: [] for k in probes}
    for r in range(ROUNDS):
        for key, model in runs.items():
            (tg,) = bench(model, n_prompt=0, n_gen=N_GEN, reps=1, seed=r)
            samples[key].append(1e3 / tg.tps[-1])
        for key, probe in probes.items():
            rates[key].append(probe.rate(seconds=0.1))
    profile = dataclasses.replace(
        load_profile("generic-cpu"), matmul={k: max(v) for k, v in rates.items()},
        threads=1, token_overhead_ms=0.0, layer_overhead_ms=0.0, plane_overhead_ms=0.0,
    )  # fmt: skip
    return {k: min(v) for k, v in samples.items()}, profile


def loaded(path, **options):
    """In memory, with the weights' layout the matvec rates were measured
    in: not repacked (as streamed slots are; on CPUs with interleaved
    kernels for these types the repacked layout decodes faster than the
    plain rates predict)."""
    import edgemoe

    return edgemoe.load(path, n_threads=1, n_ctx=256, repack=False, **options)


def predict(model, profile):
    from edgemoe.runtime.costmodel import predict as _predict

    return _predict(model.checkpoint, profile, model.routed.policy, None)


def within(predicted: float, measured: float, bound: float = 0.4) -> bool:
    return (1 - bound) * measured <= predicted <= (1 + bound) * measured


def close_all(runs: dict) -> None:
    for m in runs.values():
        m.close()


def test_expert_term_against_level_8_minus_level_2(models, probes):
    """Levels 8 and 2 of one model run the same backbone and experts; their
    difference is the expert planes' bytes plus a per-plane cost, which the
    tiny model (bytes that hardly count) measures."""
    runs = {
        (name, lv): loaded(models[name], force_level=lv)
        for name in ("tiny", "big")
        for lv in (2, 8)
    }
    try:
        ms, profile = measure(runs, probes)
        pred = {k: predict(m, profile) for k, m in runs.items()}
    finally:
        close_all(runs)

    def delta(name, attr):
        hi, lo = pred[name, 8], pred[name, 2]
        return getattr(hi, attr) - getattr(lo, attr)

    # Per plane run, what the tiny model's extra planes cost beyond their bytes.
    extra = ms["tiny", 8] - ms["tiny", 2] - delta("tiny", "experts_ms")
    per_plane = max(extra, 0.0) / delta("tiny", "plane_runs")
    measured = ms["big", 8] - ms["big", 2] - per_plane * delta("big", "plane_runs")
    predicted = delta("big", "experts_ms")
    assert predicted > 0.5  # the term is large enough to be measured here
    assert within(predicted, measured), (predicted, measured, ms)


def test_backbone_term_against_a_larger_output_head(models, probes):
    """Two models alike but for the vocabulary: their decode times differ by
    the output head's matvec (the embedding is a row lookup). The head is
    one 55 MB Q6_K matrix read with the rest of the model (about as much
    again at level 2): its rate is measured at that working set, two
    head-sized matrices in turn. (Measured at the experts' 82 MB, or at the
    head alone, the rate missed one way or the other, as this machine's
    shared 480 MiB cache held the head or not.)"""
    from edgemoe.runtime.measure import MatmulProbe

    hidden, _, vocab = SHAPES["bighead"]
    # gate, up and down of ffn rows: 3 x ffn ~ the head's rows (a multiple of 256).
    ffn = vocab // 3 // 256 * 256
    runs = {name: loaded(models[name], force_level=2) for name in ("big", "bighead")}
    try:
        with MatmulProbe("Q6_K", 1, ffn=ffn, dim=hidden, experts=2, used=1) as head:
            ms, profile = measure(runs, {**probes, "q6_k": head})
        pred = {k: predict(m, profile) for k, m in runs.items()}
    finally:
        close_all(runs)
    predicted = pred["bighead"].backbone_ms - pred["big"].backbone_ms
    measured = ms["bighead"] - ms["big"]
    assert predicted > 0.5
    assert within(predicted, measured), (predicted, measured, ms)


def test_decode_prediction_end_to_end(models, probes):
    """With the overheads measured on the tiny model (same depth and routing
    shape: per plane from level 8 minus level 2, per token from its dual-routing
    decode), the big model's dual-routing decode is predicted within 40%."""
    runs = {
        "tiny2": loaded(models["tiny"], force_level=2),
        "tiny8": loaded(models["tiny"], force_level=8),
        "tiny": loaded(models["tiny"]),
        "big": loaded(models["big"]),
    }
    try:
        ms, profile = measure(runs, probes)
        p = {k: predict(m, profile) for k, m in runs.items()}
    finally:
        close_all(runs)
    extra = ms["tiny8"] - ms["tiny2"] - (p["tiny8"].experts_ms - p["tiny2"].experts_ms)
    per_plane = max(extra, 0.0) / (p["tiny8"].plane_runs - p["tiny2"].plane_runs)
    per_token = ms["tiny"] - p["tiny"].ms_per_token - per_plane * p["tiny"].plane_runs
    fitted = dataclasses.replace(
        profile, token_overhead_ms=max(per_token, 0.0), plane_overhead_ms=per_plane
    )
    from edgemoe.runtime.costmodel import predict as _predict

    with loaded(models["big"]) as m:
        big = _predict(m.checkpoint, fitted, m.routed.policy, None)
    assert sum(share > 0.05 for share in big.planes_mix) >= 2  # levels mixed
    assert big.backbone_ms + big.experts_ms > 0.4 * big.ms_per_token  # bytes count
    assert within(big.ms_per_token, ms["big"]), (big, ms)
