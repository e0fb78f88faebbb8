"""Synthetic models with designed routing (converters/synth_routing.py): the
design routes like a trained MoE, the runtime routes as designed, and bad
designs are refused."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.converters import synth
from edgemoe.converters.synth_routing import TopicRouting
from edgemoe.errors import ConfigError
from edgemoe.locality import layer_locality

SHAPE = dict(
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=32,
    num_experts_per_tok=4,
    vocab_size=2048,
)
ROUTING = TopicRouting(n_topics=32, pool=10, gap=3.0, segment=22.0)


def design_ids(routing: TopicRouting, tokens: list[int], layers: int = 2):
    """Each layer's top-k of its router over the normalised embedding: the
    routing the design promises when the residual stream stays on it."""
    cfg = synth.preset_config("olmoe-1b-7b", layers=layers, routing=routing, **SHAPE)
    ckpt = synth.SyntheticCheckpoint(cfg)
    x = ckpt.load("token_embd.weight").data[tokens]
    x = x / np.sqrt((x**2).mean(axis=1, keepdims=True))  # [T, D]
    out = []
    for i in range(layers):
        logits = x @ ckpt.load(f"blk.{i}.ffn_gate_inp.weight").data.T  # [T, E]
        out.append(np.argsort(-logits, axis=1)[:, : SHAPE["num_experts_per_tok"]])
    return out


def test_design_routes_balanced_with_locality():
    tokens = ROUTING.stream(2048, SHAPE["vocab_size"])
    for ids in design_ids(ROUTING, tokens):
        lay = layer_locality(ids, 32, (0.4,))
        assert lay.entropy > 0.95  # near-balanced popularity
        assert lay.reuse_quartiles[1] <= 3  # a few tokens, as trained MoEs
        assert 0.85 <= lay.lru_hits[0.4] <= 0.98
    # The same model on a stream without topic runs has no such locality.
    shuffled = list(np.random.default_rng(0).permutation(tokens))
    for ids in design_ids(ROUTING, shuffled):
        assert layer_locality(ids, 32, (0.4,)).lru_hits[0.4] < 0.6


def test_runtime_routes_as_designed(tmp_path):
    import edgemoe

    cfg = synth.preset_config("olmoe-1b-7b", layers=2, routing=ROUTING, **SHAPE)
    synth.write_hf(cfg, tmp_path / "hf")
    tokens = ROUTING.stream(200, SHAPE["vocab_size"], seed=3)
    with edgemoe.load(tmp_path / "hf", n_ctx=256) as m:
        m.route_log = []
        m.eval(tokens, all_logits=True)
    steps = m.route_log
    seen = [np.sort(np.concatenate([s[il] for s in steps]), axis=1) for il in steps[0]]
    for got, want in zip(seen, design_ids(ROUTING, tokens)):
        same = (got == np.sort(want, axis=1)).all(axis=1).mean()
        assert same > 0.95, same  # residual=1 (unscaled) gives 0.86-0.90


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(pool=3), "pool 3 must lie between"),  # not above top-k (4)
        (dict(pool=32), "pool 32 must lie between"),
        (dict(gap=-1.0), "routing.gap"),
        (dict(segment=float("nan")), "routing.segment"),
        (dict(n_topics=1.5), "routing.n_topics"),
    ],
    ids=["pool-below-k", "pool-all", "gap", "segment-nan", "topics-float"],
)
def test_bad_designs_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        routing = TopicRouting(**{**ROUTING.to_dict(), **fields})
        synth.SyntheticCheckpoint(
            synth.preset_config("olmoe-1b-7b", layers=1, routing=routing, **SHAPE)
        )
    with pytest.raises(ConfigError, match="unknown routing field"):
        TopicRouting.from_dict({"pools": 3})
