"""Quant types as data: ggml block types and the nested (matryoshka) level plan.

A nested expert is a sum of planes. Plane 1 quantizes the weight; each later
plane quantizes what the planes before it left over (the residual). Level b is
the sum of the planes up to b bits, so a level is a prefix of the next and
nothing is stored twice. Every plane is a plain ggml block type, so the
runtime multiplies by a level as the sum of ggml matmuls over its planes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from edgemoe.errors import ConfigError

QK_K = 256  # super-block of the K-quants


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: its enum value, weights per block and bytes per block."""

    name: str
    ggml: int
    block: int
    nbytes: int
    bits: int
    """Bits of the codes (the precision a plane of this type adds)."""

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.block

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.nbytes


# Byte layouts as sums (ggml-common.h).
BLOCK_TYPES = {
    # scales[16] (4-bit scale | 4-bit min per 16 weights) + qs[64] + fp16 d, dmin
    "Q2_K": BlockType("Q2_K", 10, QK_K, 16 + 64 + 2 + 2, 2),
    # fp16 d, dmin + scales[12] (6-bit scale, min per 32) + qs[128]
    "Q4_K": BlockType("Q4_K", 12, QK_K, 2 + 2 + 12 + 128, 4),
    # ql[128] + qh[64] + int8 scales[16] (per 16) + fp16 d
    "Q6_K": BlockType("Q6_K", 14, QK_K, 128 + 64 + 16 + 2, 6),
    # fp16 d + 32 int8 codes
    "Q8_0": BlockType("Q8_0", 8, 32, 2 + 32, 8),
}
PLANE_FOR_BITS = {2: "Q2_K", 4: "Q4_K", 6: "Q6_K", 8: "Q8_0"}
"""The ggml type of a plane adding that many bits: the smallest K-quant with
per-sub-block scales (a 1-bit plane has no ggml type, so levels step by >= 2)."""


@dataclass(frozen=True)
class NestedQuant:
    """The level plan: ``levels=(2, 4, 8)`` gives planes of 2, 2 and 4 bits."""

    levels: tuple[int, ...] = (2, 4, 8)

    def __post_init__(self) -> None:
        lv = self.levels
        if not lv or any(not isinstance(b, int) or isinstance(b, bool) for b in lv):
            raise ConfigError(f"levels must be a list of integers, got {lv!r}")
        if list(lv) != sorted(set(lv)):
            raise ConfigError(f"levels must be strictly increasing, got {list(lv)}")
        steps = [lv[0]] + [b - a for a, b in zip(lv, lv[1:])]
        for level, step in zip(lv, steps):
            if step not in PLANE_FOR_BITS:
                raise ConfigError(
                    f"level {level} adds {step} bits; a plane adds "
                    f"{'/'.join(map(str, PLANE_FOR_BITS))} bits (ggml has no block "
                    "type for the others), e.g. levels 2,4,8 or 4,8 or 2,4,6,8"
                )

    @classmethod
    def parse(cls, text: str) -> NestedQuant:
        """``"2,4,8"`` -> NestedQuant((2, 4, 8)), with a clear error otherwise."""
        try:
            levels = tuple(int(p) for p in str(text).split(","))
        except ValueError:
            raise ConfigError(
                f"levels must be comma-separated bit widths like 2,4,8, got {text!r}"
            ) from None
        return cls(levels)

    @functools.cached_property
    def planes(self) -> tuple[BlockType, ...]:
        steps = [self.levels[0]] + [b - a for a, b in zip(self.levels, self.levels[1:])]
        return tuple(BLOCK_TYPES[PLANE_FOR_BITS[s]] for s in steps)

    def n_planes(self, level: int) -> int:
        """How many planes make up ``level``."""
        if level not in self.levels:
            raise ConfigError(f"level {level} is not one of {list(self.levels)}")
        return self.levels.index(level) + 1

    @property
    def block(self) -> int:
        """Row lengths must be a multiple of this (the largest plane block)."""
        return max(p.block for p in self.planes)

    def level_bytes(self, level: int, n: int, k: int) -> int:
        """Bytes of an [n, k] matrix at ``level`` (its planes summed)."""
        return sum(p.row_bytes(k) * n for p in self.planes[: self.n_planes(level)])
