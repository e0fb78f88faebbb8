"""Token sampling (runtime/sampling.py) against llama.cpp's sampler definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.errors import ConfigError
from edgemoe.runtime.sampling import Sampler
from edgemoe.sampling_params import SamplingParams

V = 50


def sampler(**kw) -> Sampler:
    return Sampler(SamplingParams(**kw))


def random_logits(seed: int, n: int = V, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# -- greedy and seeds ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(5), ids=lambda s: f"logits{s}")
def test_temperature_zero_is_argmax(seed):
    logits = random_logits(seed)
    s = sampler(temperature=0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
    assert s(logits, []) == int(np.argmax(logits))
    # Greedy ignores top-k/top-p/min-p entirely.
    s = sampler(temperature=0, top_k=3, top_p=0.2, min_p=0.5)
    assert s(logits, [1, 2, 3]) == int(np.argmax(logits))


def draws(seed: int | None, n: int = 64, **kw) -> list[int]:
    # Flat logits: every draw has ~V equally likely outcomes.
    logits = random_logits(123, scale=0.1)
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
    params.update(kw)
    s = sampler(**params)
    return [s(logits, []) for _ in range(n)]


def test_same_seed_same_tokens():
    assert draws(7) == draws(7)


def test_different_seed_different_tokens():
    a, b = draws(7), draws(8)
    assert a != b
    # Not just one position: two independent streams agree on ~1/V of draws.
    assert sum(x == y for x, y in zip(a, b)) < len(a) // 4


def test_draws_are_not_degenerate():
    # A sampler that ignored the rng (always argmax) would pass the seed tests.
    assert len(set(draws(7))) > 10


@pytest.mark.parametrize(
    "temperature", [0.05, 0.7, 1.0, 5.0, 1000.0], ids=lambda t: f"T{t}"
)
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    for seed in range(10):
        logits = random_logits(seed, scale=0.5)
        s = sampler(temperature=temperature, top_k=1, top_p=1.0, min_p=0.0, seed=seed)
        assert s(logits, []) == int(np.argmax(logits))


# -- truncation: top-k, top-p, min-p ------------------------------------------


def allowed_set(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> set:
    """Tokens llama.cpp's chain (top-k, top-p, min-p) may keep, in float64.

    A token passes top-p if the probability mass strictly above it (within the
    top-k candidates) is below p; a small tolerance covers rounding."""
    x = logits.astype(np.float64)
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    above = np.cumsum(p) - p
    keep = above < top_p + 1e-9
    keep &= p >= min_p * p[0] * (1 - 1e-9)
    return {int(t) for t in order[keep]}


@settings(max_examples=150, deadline=None, database=None)
@given(
    logits=st.lists(
        st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=40
    ),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 0.99),
    temperature=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_truncation_never_returns_a_token_outside_the_allowed_set(
    logits, top_k, top_p, min_p, temperature, seed
):
    x = np.asarray(logits, dtype=np.float32)
    allowed = allowed_set(x, top_k, top_p, min_p)
    s = sampler(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    for _ in range(10):
        assert s(x, []) in allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Probabilities 0.5, 0.3, 0.15, 0.05: p=0.75 needs the first two only.
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs).astype(np.float32)
    s = sampler(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0, seed=0)
    got = {s(logits, []) for _ in range(300)}
    assert got == {1, 3}


def test_min_p_drops_tokens_below_the_fraction_of_the_top():
    probs = np.array([0.4, 0.3, 0.19, 0.11])  # 0.11 < 0.3 * 0.4 < 0.19
    logits = np.log(probs).astype(np.float32)
    s = sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, seed=0)
    got = {s(logits, []) for _ in range(300)}
    assert got == {0, 1, 2}


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    s = sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    counts = np.bincount([s(logits, []) for _ in range(4000)], minlength=3)
    assert_frequencies(counts, [0.6, 0.3, 0.1])
    # Temperature 0.5 squares the probabilities: 0.36 : 0.09 : 0.01, so the
    # last token is drawn 2.2% of the time; a sampler that never draws it fails.
    s = sampler(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    counts = np.bincount([s(logits, []) for _ in range(4000)], minlength=3)
    assert_frequencies(counts, np.array([36, 9, 1]) / 46)


def assert_frequencies(counts, probs) -> None:
    """Each token's frequency within 4 binomial standard deviations of its
    probability (the seed is fixed: this cannot flake)."""
    n, p = counts.sum(), np.asarray(probs)
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(counts / n - p) <= 4 * sd), (counts / n, p, sd)


# -- repetition penalty -------------------------------------------------------


def greedy_with_penalty(logits, history, penalty=2.0, last_n=64) -> int:
    s = sampler(temperature=0, repeat_penalty=penalty, repeat_last_n=last_n)
    return s(np.asarray(logits, dtype=np.float32), history)


@pytest.mark.parametrize(
    "logits, expected",
    [
        # Positive logit divided: 3.0 -> 1.5 < 2.0.
        ([3.0, 2.0, 0.0], 1),
        # Negative logit multiplied: -1.0 -> -2.0 < -1.5 (dividing would give
        # -0.5 and keep token 0 on top).
        ([-1.0, -1.5, -9.0], 1),
    ],
    ids=["positive_divided", "negative_multiplied"],
)
def test_repeat_penalty_lowers_a_repeated_token(logits, expected):
    assert greedy_with_penalty(logits, [], penalty=1.0) == 0
    assert greedy_with_penalty(logits, [0]) == expected


def test_repeat_penalty_applies_once_per_distinct_token():
    # llama.cpp's repeat penalty does not compound with the count:
    # 4.0 / 2 = 2.0 stays above 1.5 however often token 0 occurred.
    assert greedy_with_penalty([4.0, 1.5], [0, 0, 0, 0]) == 0
    assert greedy_with_penalty([2.9, 1.5], [0, 0, 0, 0]) == 1


def test_repeat_penalty_only_looks_at_the_last_n_tokens():
    logits = [3.0, 2.0, 0.0]
    assert greedy_with_penalty(logits, [0, 2, 2], last_n=3) == 1
    assert greedy_with_penalty(logits, [0, 2, 2], last_n=2) == 0


def test_repeat_last_n_zero_disables_the_penalty():
    # llama.cpp: "repeat_last_n ... 0 = disabled, -1 = ctx_size".
    assert greedy_with_penalty([3.0, 2.0], [0], last_n=0) == 0


def test_repeat_last_n_minus_one_is_the_whole_history():
    history = [0] + [2] * 500
    assert greedy_with_penalty([3.0, 2.0, 0.0], history, last_n=64) == 0
    assert greedy_with_penalty([3.0, 2.0, 0.0], history, last_n=-1) == 1


def test_repeat_penalty_reaches_the_sampled_distribution():
    # With top_k=1 the penalised token can only be picked if it stays on top.
    s = sampler(temperature=1.0, top_k=1, repeat_penalty=2.0, seed=0)
    assert s(np.array([3.0, 2.0], dtype=np.float32), [0]) == 1


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.1),
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=math.nan),
        dict(min_p=-0.1),
        dict(min_p=1.0),
        dict(min_p=math.nan),
        dict(repeat_penalty=0.0),
        dict(repeat_penalty=-1.0),
        dict(repeat_penalty=math.nan),
        dict(repeat_last_n=-2),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_params_raise_config_error(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
        dict(repeat_penalty=1.3, repeat_last_n=0),
        dict(repeat_last_n=-1),
    ],
    ids=["defaults", "edges", "last_n_0", "last_n_all"],
)
def test_valid_edge_params_are_accepted(kw):
    s = Sampler(SamplingParams(**kw))
    assert 0 <= s(random_logits(0), [1, 2, 3]) < V


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_are_a_typed_error(bad, temperature):
    """Corrupt weights give NaN logits; the sampler used to fail with an
    IndexError (a fuzzer's finding) or pick the NaN's index greedily."""
    from edgemoe.errors import ModelOutputError

    logits = np.zeros(8, np.float32)
    logits[3] = bad
    s = sampler(temperature=temperature, top_k=0, top_p=1.0, min_p=0.05, seed=0)
    with pytest.raises(ModelOutputError, match="non-finite logits"):
        s(logits, [])


def test_a_tiny_repeat_penalty_still_samples():
    """--repeat-penalty 1e-320 divides positive logits into infinity."""
    logits = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
    s = sampler(temperature=0.8, repeat_penalty=1e-320, seed=0)
    for _ in range(20):
        assert s(logits, [1, 3]) in range(4)
