"""Every expert plane a model will run, resident from load on.

A converted model in memory, or under a budget that holds every plane its
policy can run, needs no slots, eviction or reads after load. Each MoE
layer's experts get their own ``[E + 1, N, K]`` tensor per (plane,
projection), slot E all zeros (the protected-expert table's target, and the
slot host-placed rows point a plane at when they skip it). The tensors live
in a backend buffer: on the CPU ggml's repacked layout where it has
interleaved kernels for the type (as llama.cpp's weights), else the
backend's own buffer (a GPU's memory). Loading streams one (layer, plane)
at a time through one staging array, CRC-checked by the I/O queue, and
writes each tensor whole: the peak is what stays plus that array, not twice
the experts.
"""

from __future__ import annotations

import numpy as np

from edgemoe.checkpoint.base import aligned_empty
from edgemoe.format.spec import PROJS
from edgemoe.runtime.device import T, WeightSet
from edgemoe.runtime.expert_cache import CacheCounters
from edgemoe.runtime.io_queue import DEMAND, PAGE, IOQueue, ReadRequest


def staging_bytes(n_expert: int, plane_bytes) -> int:
    """The load's staging array: one layer's largest plane, zero slot included."""
    return (n_expert + 1) * max(plane_bytes)


class ResidentPlanes:
    """The first ``n_planes`` planes of every expert, per layer, loaded once.

    Answers the questions the routed path asks of an expert store (slots,
    residency, counters) the way a store that never misses would."""

    def __init__(
        self,
        ckpt,
        weights: WeightSet,
        io: IOQueue,
        n_planes: int,
        verify: bool = True,
        repack: bool = True,
    ):
        m = ckpt.manifest
        self.ckpt, self.manifest, self.io, self.weights = ckpt, m, io, weights
        self.planes = m.plan.planes
        self.n_planes = n_planes
        self.n_expert = e = ckpt.spec.n_expert
        self.moe_layers = m.moe_layers
        self.verify = verify
        from edgemoe.runtime.offload import plane_bytes

        shapes = ckpt.plane_shapes()
        self._shape = {
            (p, proj): (shapes[proj][0], bt.row_bytes(shapes[proj][1]))
            for p, bt in enumerate(self.planes)
            for proj in PROJS
        }
        self.plane_bytes = list(plane_bytes(ckpt))
        self._tensors: dict[int, tuple[tuple[T, T, T], ...]] = {}
        for layer in self.moe_layers:
            self._tensors[layer] = tuple(
                tuple(
                    weights.add_device(
                        f"blk.{layer}.experts.p{p}.{proj}",
                        self.planes[p].ggml,
                        (e + 1, shapes[proj][0], shapes[proj][1]),
                        repack=repack,
                    )
                    for proj in PROJS
                )
                for p in range(n_planes)
            )
        self.slots = (e,) * n_planes
        """Per plane, the slot index past the experts: the zero slot."""
        self.zero = list(self.slots)
        self.store = "resident"
        self.counters = CacheCounters([0] * len(self.planes), [0] * len(self.planes))
        self.loaded = False

    def load(self) -> None:
        """Read and write every plane (after ``WeightSet.finalize``)."""
        e = self.n_expert
        rows = {proj: max(self._shape[p, proj][1] * self._shape[p, proj][0]
                          for p in range(self.n_planes)) for proj in PROJS}  # fmt: skip
        raw = {
            proj: aligned_empty(((e + 1) * rows[proj],), np.uint8, PAGE)
            for proj in PROJS
        }
        for layer in self.moe_layers:
            for p in range(self.n_planes):
                stage = {}
                for proj in PROJS:
                    n, rb = self._shape[p, proj]
                    stage[proj] = raw[proj][: (e + 1) * n * rb].reshape(e + 1, n * rb)
                    stage[proj][e] = 0  # the zero slot
                reqs = [self._read(layer, x, p, stage) for x in range(e)]
                for req in reqs:
                    req.done.wait()
                for req in reqs:
                    if req.error is not None:
                        raise req.error
                for t, proj in zip(self._tensors[layer][p], PROJS):
                    self.weights.write(t, stage[proj])
        self.loaded = True

    def _read(self, layer: int, expert: int, p: int, stage) -> ReadRequest:
        ref = self.manifest.experts[layer][expert][p]
        return self.io.submit(
            ReadRequest(
                priority=(DEMAND, self.io.new_seq()),
                seq=0,
                key=(layer, expert, p),
                path=self.ckpt.root / self.manifest.shards[ref.shard].file,
                offset=ref.offset,
                length=ref.length,
                parts=ref.parts,
                dest=[stage[proj][expert] for proj in PROJS],
                crc32=ref.crc32 if self.verify else None,
            )
        )

    # -- what the routed path asks -------------------------------------------------
    def tensors_for(self, layer: int) -> tuple[tuple[T, T, T], ...]:
        return self._tensors[layer]

    def slot(self, layer: int, expert: int, plane: int) -> int:
        return expert

    def resident_planes(self, layer: int, expert: int) -> int:
        return self.n_planes if self.loaded else 0

    def resident_bytes(self) -> list[int]:
        n = len(self.moe_layers) * self.n_expert if self.loaded else 0
        return [
            n * b if p < self.n_planes else 0 for p, b in enumerate(self.plane_bytes)
        ]

    def notify(self, req) -> None:
        """The I/O queue's callback: ``load`` waits on each request itself."""
