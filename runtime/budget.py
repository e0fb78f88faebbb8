"""Memory budgets: parsing sizes, and splitting what a budget leaves for experts
between the plane slot pools (the whole plan is offload.MemoryPlan)."""

from __future__ import annotations

from edgemoe.units import fmt_size, parse_size  # noqa: F401  (re-exported)


def plan_slots(
    budget: int,
    fixed: int,
    plane_bytes: tuple[int, ...],
    n_experts_total: int,
    min_slots: int,
    planes_required: int,
    forced: bool = False,
    protected: int = 0,
    shares: tuple[float, ...] | None = None,
) -> tuple[int, ...]:
    """Expert slots per plane for ``budget - fixed`` bytes.

    Plane 1 (every expert needs it) gets half, up to one slot per expert of
    the model; the higher planes share the rest with equal slot counts, so
    any expert can be lifted to the top level. ``planes_required`` planes must
    each hold ``min_slots``. With ``forced``, every expert runs exactly that
    many planes: they share the room equally, and the planes above hold only
    the ``protected`` experts (which always run at the top level). With
    ``shares`` (a preset: plane p runs on that share of the experts plane 1
    runs on) the pools follow them: plane p holds share_p slots per plane-1
    slot, a plane no expert runs holds only the protected ones, and what
    plane 1 cannot use goes to the planes above.
    """
    p = len(plane_bytes)
    above = protected * sum(plane_bytes[planes_required:]) if forced else 0
    room = budget - fixed - sum(plane_bytes) - above  # and the zero slots
    need = min_slots * sum(plane_bytes[:planes_required])
    if room < need:
        raise ValueError(need - room)
    if shares is not None and not forced and p > 1:
        return _by_shares(
            room, plane_bytes, n_experts_total, min_slots, shares, protected
        )
    if forced or planes_required == p or p == 1:
        s = min(n_experts_total, room // sum(plane_bytes[:planes_required]))
        return (s,) * planes_required + (protected,) * (p - planes_required)
    first = min(n_experts_total, max(min_slots, room // 2 // plane_bytes[0]))
    rest = (room - first * plane_bytes[0]) // sum(plane_bytes[1:])
    rest = min(n_experts_total, rest)
    return (first,) + (rest,) * (p - 1)


def _by_shares(room, plane_bytes, n_total, min_slots, shares, protected):
    unused = [q for q in range(1, len(plane_bytes)) if shares[q] <= 0]
    room -= protected * sum(plane_bytes[q] for q in unused)
    if room < min_slots * plane_bytes[0]:
        raise ValueError(min_slots * plane_bytes[0] - room)
    per = sum(w * b for w, b in zip(shares, plane_bytes))
    first = min(n_total, max(min_slots, int(room // per)))
    left = room - first * plane_bytes[0]
    upper = sum(shares[q] * plane_bytes[q] for q in range(1, len(plane_bytes)))
    out = [first]
    for q in range(1, len(plane_bytes)):
        if shares[q] <= 0:
            out.append(protected)
        else:  # with room for every plane 1, the rest goes up
            out.append(min(n_total, int(left * shares[q] / upper)))
    return tuple(out)
