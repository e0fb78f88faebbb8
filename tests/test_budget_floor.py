"""A budget at or above the minimum the runtime reports always runs: any
sequence length, seed, thread count or level (issue: "expert cache has no
free slot for plane 1" at 60 MiB, with a reported minimum of 59.1 MiB)."""

from __future__ import annotations

import re

import pytest

import edgemoe
from edgemoe.errors import ConfigError


def reported_minimum(path, **options) -> int:
    """The minimum, in bytes, as the refusal of a 1-byte budget states it."""
    with pytest.raises(ConfigError) as err:
        edgemoe.load(path, budget=1, **options)
    found = re.search(r"the minimum \S+ \S+ \((\d+) bytes\)", str(err.value))
    assert found, str(err.value)
    return int(found.group(1))


def generate(model, seed: int, n: int) -> int:
    model.reset()
    out = model.generate(
        "def", max_tokens=n, ignore_eos=True, seed=seed, temperature=1.0, top_k=0,
        top_p=1.0, min_p=0.0,
    )  # fmt: skip
    return sum(1 for _ in out)


def check(path, threads, level, seeds, extra: int | float = 0) -> None:
    """``extra``: bytes above the minimum, or (a float) that share of every
    expert plane's bytes, 1.0 being the whole model."""
    ctx = dict(n_ctx=512, n_threads=threads, force_level=level)
    if isinstance(extra, float):
        from edgemoe.format.reader import EdgeCheckpoint

        ckpt = EdgeCheckpoint(path)
        extra = int(extra * max(ckpt.level_bytes().values()))
        ckpt.close()
    budget = reported_minimum(path, **ctx) + extra
    with edgemoe.load(path, budget=budget, **ctx) as model:
        for seed in seeds:
            assert generate(model, seed, 400) == 400, (budget, seed)
        if level is not None:
            # Every (token, expert) pair ran at exactly the forced level.
            runs = model.routed.planes_run
            n = model.checkpoint.manifest.plan.n_planes(level)
            assert runs[n] > 0 and runs.sum() == runs[n], runs
        if not extra:
            assert model.counters()["evictions"] > 100  # it really streamed


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("level", [None, 8])
def test_minimum_budget_runs_400_tokens(converted_fixture, threads, level):
    check(converted_fixture, threads, level, seeds=(1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [1 << 20, 8 << 20, 0.5, 1.0])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("level", [None, 2, 8])
def test_budgets_above_minimum_run_400_tokens(converted_fixture, threads, level, extra):
    check(converted_fixture, threads, level, seeds=(3, 4, 5), extra=extra)
