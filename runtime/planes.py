"""Expert planes of a converted model, resident in memory.

Per layer, plane and projection one slab ``[E + 1, N, row_bytes]``: a slot per
expert plus an all-zero slot, bound zero-copy as a ggml tensor that
``mul_mat_id`` indexes. Only planes some expert runs at are read; the other
slots stay untouched pages (no memory).
"""

from __future__ import annotations

import numpy as np

from edgemoe.checkpoint.base import Weight, aligned_empty
from edgemoe.errors import ConfigError
from edgemoe.format.spec import PROJS
from edgemoe.runtime.forward import ExpertPlanes
from edgemoe.runtime.graph import WeightSet


def planes_for_level(ckpt, layer: int, level: int | None) -> np.ndarray:
    """[E] planes each expert of ``layer`` runs: ``level``'s (the top one when
    None); protected (super) experts always run every plane."""
    m = ckpt.manifest
    plan = m.plan
    top = len(plan.planes)
    n = top if level is None else plan.n_planes(level)
    out = np.full(ckpt.spec.n_expert, n, dtype=np.int64)
    out[list(m.protected[layer])] = top
    return out


def load_expert_planes(
    ckpt, layer: int, weights: WeightSet, planes_for: np.ndarray
) -> ExpertPlanes:
    """Read the planes ``planes_for`` needs into slabs and bind them."""
    m = ckpt.manifest
    e_count = ckpt.spec.n_expert
    shapes = ckpt.plane_shapes()
    tensors, shifts = [], []
    for p, bt in enumerate(m.plan.planes):
        slabs = {}
        for proj in PROJS:
            n, k = shapes[proj]
            if k % bt.block:
                raise ConfigError(
                    f"{proj} rows of {k} do not split into {bt.name} blocks"
                )
            slab = aligned_empty((e_count + 1, n, bt.row_bytes(k)), np.uint8)
            slab[e_count] = 0  # the zero slot: a plane that adds nothing
            slabs[proj] = slab
        for e in np.nonzero(planes_for > p)[0]:
            for proj, part in zip(PROJS, ckpt.read_plane(layer, int(e), p)):
                slabs[proj][e] = part.reshape(slabs[proj][e].shape)
        handles = tuple(
            weights.add(
                Weight(
                    f"blk.{layer}.{proj}.p{p}",
                    bt.ggml,
                    (e_count + 1, *shapes[proj]),
                    slabs[proj],
                )
            )
            for proj in PROJS
        )
        tensors.append(handles)
        shifts.append(tuple(m.shifts[layer][j][p] for j in range(3)))
    return ExpertPlanes(tensors, shifts, e_count + 1, e_count, planes_for)
