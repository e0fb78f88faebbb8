"""Routing locality statistics on constructed traces with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgemoe.locality import (
    layer_locality,
    lru_hit_rate,
    markdown,
    popularity_entropy,
    reuse_distances,
)


def test_entropy_of_balanced_and_collapsed_routing():
    balanced = np.arange(64).reshape(16, 4)  # every expert once
    assert popularity_entropy(balanced, 64) == pytest.approx(1.0)
    assert popularity_entropy(np.zeros((10, 1), dtype=int), 8) == 0.0
    # Two experts of four, equally: log 2 / log 4.
    assert popularity_entropy(np.array([[0], [1], [0], [1]]), 4) == pytest.approx(0.5)
    # Skewed: 3/4 and 1/4 of picks over 4 experts.
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert popularity_entropy(np.array([[0], [0], [0], [1]]), 4) == pytest.approx(h)


def test_reuse_distance_counts_tokens_since_last_pick():
    ids = np.array([[0, 1], [0, 2], [1, 0], [3, 2]])
    # expert 0 at tokens 0,1,2 -> 1,1; expert 1 at 0,2 -> 2; expert 2 at 1,3 -> 2
    assert sorted(reuse_distances(ids).tolist()) == [1, 1, 2, 2]
    assert reuse_distances(np.array([[0, 1], [2, 3]])).size == 0


@pytest.mark.parametrize(
    "seq, capacity, hits",
    [
        ([0, 1, 0, 1], 1, 0),  # each pick evicts the other
        ([0, 1, 0, 1], 2, 2),
        ([0, 1, 2, 0], 2, 0),  # 0 left when 2 came
        ([0, 1, 0, 2, 0], 2, 2),  # 0 was used last, so 2 evicts 1 (FIFO: 0)
        ([0, 1, 2, 3, 0, 1], 3, 0),  # a cycle one longer than the cache
    ],
    ids=["thrash", "fits", "evicted", "recency-not-arrival", "cycle"],
)
def test_lru_hit_rate_on_single_expert_traces(seq, capacity, hits):
    ids = np.array(seq).reshape(-1, 1)
    assert lru_hit_rate(ids, capacity) == pytest.approx(hits / len(seq))


def test_lru_counts_a_tokens_experts_together():
    # K = 2, capacity 2: token 1 keeps expert 0 (hit) and brings 2, evicting 1.
    ids = np.array([[0, 1], [0, 2], [1, 2]])
    assert lru_hit_rate(ids, 2) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="capacity"):
        lru_hit_rate(ids, 0)


def test_layer_summary_and_table():
    rng = np.random.default_rng(0)
    # A stream that keeps its 4 experts for 8 tokens, then moves on.
    ids = np.concatenate(
        [np.tile(rng.permutation(16)[:4], (8, 1)) for _ in range(32)]
    )  # [256, 4]
    lay = layer_locality(ids, 16, fractions=(0.25, 0.5))
    assert lay.tokens == 256
    assert lay.reuse_quartiles[1] == 1.0
    # 4 misses per 8-token block at most (some experts carry over).
    assert 1 - 4 / 32 <= lay.lru_hits[0.25] <= 1.0
    assert lay.lru_hits[0.5] >= lay.lru_hits[0.25]
    assert 0.8 < lay.entropy <= 1.0
    table = markdown([lay, lay], 16)
    assert table.count("\n") == 4 and "| mean |" in table
    with pytest.raises(ValueError, match="0..15"):
        layer_locality(np.array([[16]]), 16)
