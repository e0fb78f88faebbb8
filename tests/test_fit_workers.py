"""The converter's fitting processes: results, errors and ends."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.converters.expert_layer import FitJob, fit_expert
from edgemoe.converters.fit_workers import FitPool
from edgemoe.errors import EdgeMoEError
from edgemoe.quant.nested import plane_shifts
from edgemoe.quant.types import NestedQuant

PLAN = NestedQuant.parse("2,4,8")


def job(source: str = "", mats=None, expert: int = 0) -> FitJob:
    rng = np.random.default_rng(expert)
    if mats is None and not source:
        mats = (
            rng.standard_normal((256, 512)).astype(np.float32),
            rng.standard_normal((256, 512)).astype(np.float32),
            rng.standard_normal((512, 256)).astype(np.float32),
        )
    shifts = (plane_shifts(PLAN, 4.0),) * 3
    rows = (("gate", 256), ("up", 256), ("down", 512))
    imat = rng.gamma(1.0, size=512).astype(np.float32)
    return FitJob(source, "blk.0.", expert, rows, 256, 512, PLAN, shifts, imat, mats)


def test_a_worker_fits_as_this_process_does():
    jobs = [job(expert=e) for e in range(3)]
    with FitPool(2) as pool:
        got = [f.result() for f in [pool.submit(j) for j in jobs]]
    for j, planes in zip(jobs, got):
        want = fit_expert(j, {})
        assert len(planes) == 3
        for a, b in zip(planes, want):
            assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_workers_error_is_one_line_and_the_pool_goes_on(tmp_path):
    with FitPool(1) as pool:
        with pytest.raises(EdgeMoEError, match="missing"):
            pool.submit(job(source=str(tmp_path / "missing"))).result()
        assert len(pool.submit(job()).result()) == 3


def test_a_worker_that_dies_fails_its_job_not_the_caller():
    pool = FitPool(1)
    try:
        pool._procs[0].kill()
        pool._procs[0].wait()
        with pytest.raises(EdgeMoEError, match="ended unexpectedly"):
            pool.submit(job()).result(timeout=60)
    finally:
        pool.close()  # returns: nothing waits on the dead process
