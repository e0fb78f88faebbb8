"""Measuring this machine for a device profile: ggml decode matvec rates.

A decode step multiplies one activation row by expert matrices picked by
``mul_mat_id``. The weights cycle through more experts than any cache holds,
so the rate is what streaming them from DRAM through ggml's kernels gives.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.checkpoint.base import Weight, aligned_empty
from edgemoe.quant.kquants import codec
from edgemoe.quant.types import BLOCK_TYPES
from edgemoe.runtime.graph import Device, Graph, WeightSet


def matmul_rate(
    type_name: str,
    n_threads: int | None = None,
    rows: int = 1024,
    k: int = 2048,
    experts: int = 64,
    used: int = 8,
    seconds: float = 0.6,
) -> float:
    """GB/s of ``type_name`` weights one-row ``mul_mat_id`` streams."""
    bt = BLOCK_TYPES[type_name]
    rng = np.random.default_rng(0)
    one = codec(type_name).quantize(
        rng.standard_normal((rows, k)).astype(np.float32)
    )  # [rows, row bytes]
    slab = aligned_empty((experts, rows, bt.row_bytes(k)), np.uint8)
    slab[:] = one  # the same valid blocks in every expert: only bytes matter
    device = Device("cpu", n_threads)
    ws = WeightSet(device, capacity=2)
    g = Graph(device, n_tensors=16)
    try:
        w = ws.add(Weight("bench", bt.ggml, (experts, rows, k), slab))
        ws.finalize()
        x = aligned_empty((1, 1, k), np.float32)
        x[:] = rng.standard_normal(k)
        ids = aligned_empty((1, used), np.int32)
        out = aligned_empty((1, used, rows), np.float32)
        g.output(g.mul_mat_id(w, g.input(x), g.ids(ids, experts)), out)
        g.build()
        step = 0

        def run() -> None:
            nonlocal step
            # Consecutive calls touch disjoint experts: nothing stays cached.
            ids[0] = (np.arange(used) + step * used) % experts
            step += 1
            g.compute()

        for _ in range(experts // used):
            run()
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(times) < 8:
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        # The median, as a decode step sees it: cold weights, waking threads.
        median = float(np.median(times))
        return used * rows * bt.row_bytes(k) / median / 1e9
    finally:
        g.free()
        ws.free()
        device.close()
