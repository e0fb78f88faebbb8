"""Measuring this machine for a device profile: ggml decode matvec rates and
expert-plane reads under compute (edgemoe/commands/probe_costs.py fits the
engine's own costs per decode token on top of them).

A decode step multiplies one activation row by expert matrices picked by
``mul_mat_id``. The probe's weights cycle through more experts than a core's
cache holds, so its rate is what streaming them through ggml's kernels gives.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.checkpoint.base import Weight, aligned_empty
from edgemoe.quant.kquants import codec
from edgemoe.quant.types import BLOCK_TYPES
from edgemoe.runtime.device import Device, WeightSet
from edgemoe.runtime.graph import Graph


class MatmulProbe:
    """A decode step's routed-expert FFN graph over ``type_name`` weights:
    gate and up ``mul_mat_id``, SwiGLU, down ``mul_mat_id``, one token, built
    once so that its rate can be sampled again and again (a timing test
    interleaves samples with the decodes it compares them to)."""

    def __init__(
        self,
        type_name: str,
        n_threads: int | None = None,
        ffn: int = 1024,
        dim: int = 2048,
        experts: int = 64,
        used: int = 8,
    ):
        bt = BLOCK_TYPES[type_name]
        rng = np.random.default_rng(0)
        self.experts, self.used = experts, used
        self.bytes_per_token = used * self.expert_bytes(type_name, ffn, dim)
        self._device = Device("cpu", n_threads)
        self._ws = WeightSet(self._device, capacity=4)
        self._g = g = Graph(self._device, n_tensors=32)
        try:
            mats = {}
            for name, (n, k) in {
                "gate": (ffn, dim),
                "up": (ffn, dim),
                "down": (dim, ffn),
            }.items():
                one = codec(type_name).quantize(
                    rng.standard_normal((n, k)).astype(np.float32)
                )  # [n, row bytes]
                slab = aligned_empty((experts, n, bt.row_bytes(k)), np.uint8)
                slab[:] = (
                    one  # the same valid blocks in every expert: only bytes matter
                )
                w = Weight(f"bench.{name}", bt.ggml, (experts, n, k), slab)
                mats[name] = self._ws.add(w)
            self._ws.finalize()
            x = aligned_empty((1, 1, dim), np.float32)
            x[:] = rng.standard_normal(dim)
            self._ids = aligned_empty((1, used), np.int32)
            out = aligned_empty((1, used, dim), np.float32)
            tid = g.ids(self._ids, experts)
            xin = g.input(x)
            act = g.swiglu(
                g.mul_mat_id(mats["gate"], xin, tid), g.mul_mat_id(mats["up"], xin, tid)
            )  # [1, U, F]
            g.output(g.mul_mat_id(mats["down"], act, tid), out)
            g.build()
        except BaseException:
            self.close()
            raise
        self._step = 0
        for _ in range(experts // used):
            self._run()

    @staticmethod
    def expert_bytes(type_name: str, ffn: int, dim: int) -> int:
        """Bytes of one expert's gate, up and down in ``type_name``."""
        bt = BLOCK_TYPES[type_name]
        return 2 * ffn * bt.row_bytes(dim) + dim * bt.row_bytes(ffn)

    def _run(self) -> None:
        # Consecutive calls touch disjoint experts: nothing stays cached.
        self._ids[0] = (np.arange(self.used) + self._step * self.used) % self.experts
        self._step += 1
        self._g.compute()

    def rate(self, seconds: float = 0.6) -> float:
        """GB/s of expert weights streamed: the median step of ``seconds`` of
        steps (at least 8), as a decode step sees it: cold weights, waking
        threads."""
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(times) < 8:
            t = time.perf_counter()
            self._run()
            times.append(time.perf_counter() - t)
        return self.bytes_per_token / float(np.median(times)) / 1e9

    def close(self) -> None:
        self._g.free()
        self._ws.free()
        self._device.close()

    def __enter__(self) -> MatmulProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def matmul_rate(
    type_name: str, n_threads: int | None = None, seconds: float = 0.6, **shape: int
) -> float:
    """GB/s of ``type_name`` expert weights that one token's expert FFN graph
    streams, measured over ``seconds`` at each thread count from 1 to
    ``n_threads`` (None: the physical cores); the fastest is kept, as the
    engine's thread tuner keeps the count that runs fastest (on a busy
    machine two threads can be slower than one). ``shape``: ``MatmulProbe``'s
    ffn, dim, experts and used."""
    from edgemoe.runtime.device import default_threads

    best = 0.0
    for n in range(1, (n_threads or default_threads()) + 1):
        with MatmulProbe(type_name, n, **shape) as probe:
            best = max(best, probe.rate(seconds))
    return best


def queue_reads(path, size: int, count: int = 24, seed: int = 0) -> float:
    """Median seconds for one ``size``-byte read of ``path`` at a random
    offset through the runtime's own I/O queue as it reads by default (O_DIRECT
    where the file system takes it, else buffered pread with the pages
    dropped), one at a time: what a plane miss costs before its bytes are in."""
    import os
    from pathlib import Path

    from edgemoe.runtime.io_queue import PAGE, ReadRequest, get_io_backend

    total = os.path.getsize(path)
    rng = np.random.default_rng(seed)
    dest = aligned_empty((size,), np.uint8, PAGE)
    q = get_io_backend("auto", threads=1, probe=Path(path))
    q.start()
    times = []
    try:
        for i in range(count):
            off = int(rng.integers(0, max(total - size, 1) // 4096)) * 4096
            req = ReadRequest((0,), 0, (0, 0, i), path, off, size, ((0, size),), [dest])
            t = time.perf_counter()
            q.submit(req)
            req.done.wait()
            times.append(time.perf_counter() - t)
            if req.error is not None:
                raise req.error
    finally:
        q.close()
    return float(np.median(times))


class BusyCompute:
    """Runs a decode-sized ggml graph on ``n_threads`` in a loop, in the
    background, so that reads are timed against compute as in a real decode
    (the I/O threads then wait for a core)."""

    def __init__(self, n_threads: int | None = None):
        import threading

        self.n_threads = n_threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        bt = BLOCK_TYPES["Q8_0"]
        device = Device("cpu", self.n_threads)
        ws = WeightSet(device, capacity=2)
        g = Graph(device, n_tensors=8)
        try:
            rows, k = 2048, 2048
            w = aligned_empty((rows, bt.row_bytes(k)), np.uint8)
            w[:] = codec("Q8_0").quantize(
                rng.standard_normal((rows, k)).astype(np.float32)
            )
            t = ws.add(Weight("busy", bt.ggml, (rows, k), w))
            ws.finalize()
            x = aligned_empty((1, k), np.float32)
            out = aligned_empty((1, rows), np.float32)
            g.output(g.mul_mat(t, g.input(x)), out)
            g.build()
            while not self._stop.is_set():
                g.compute()
        finally:
            g.free()
            ws.free()
            device.close()

    def __enter__(self) -> BusyCompute:
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
