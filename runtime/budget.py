"""Memory budgets: parsing sizes, and splitting a budget between the resident
backbone, the KV cache, compute scratch and the expert plane slots."""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.units import fmt_size, parse_size  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class BudgetPlan:
    """How a budget is spent. ``slots[p]`` expert slots for plane p."""

    total: int
    backbone: int
    kv_cache: int
    scratch: int
    plane_bytes: tuple[int, ...]
    """Bytes of one expert's plane p (gate + up + down)."""
    slots: tuple[int, ...]

    @property
    def experts(self) -> int:
        # One extra, all-zero slot per plane (see runtime/expert_cache.py).
        return sum((s + 1) * b for s, b in zip(self.slots, self.plane_bytes))

    @property
    def used(self) -> int:
        return self.backbone + self.kv_cache + self.scratch + self.experts


def plan_slots(
    budget: int,
    fixed: int,
    plane_bytes: tuple[int, ...],
    n_experts_total: int,
    min_slots: int,
    planes_required: int,
    forced: bool = False,
    protected: int = 0,
) -> tuple[int, ...]:
    """Expert slots per plane for ``budget - fixed`` bytes.

    Plane 1 (every expert needs it) gets half, up to one slot per expert of
    the model; the higher planes share the rest with equal slot counts, so
    any expert can be lifted to the top level. ``planes_required`` planes must
    each hold ``min_slots``. With ``forced``, every expert runs exactly that
    many planes: they share the room equally, and the planes above hold only
    the ``protected`` experts (which always run at the top level).
    """
    p = len(plane_bytes)
    above = protected * sum(plane_bytes[planes_required:]) if forced else 0
    room = budget - fixed - sum(plane_bytes) - above  # and the zero slots
    need = min_slots * sum(plane_bytes[:planes_required])
    if room < need:
        raise ValueError(need - room)
    if forced or planes_required == p or p == 1:
        s = min(n_experts_total, room // sum(plane_bytes[:planes_required]))
        return (s,) * planes_required + (protected,) * (p - planes_required)
    first = min(n_experts_total, max(min_slots, room // 2 // plane_bytes[0]))
    rest = (room - first * plane_bytes[0]) // sum(plane_bytes[1:])
    rest = min(n_experts_total, rest)
    return (first,) + (rest,) * (p - 1)
