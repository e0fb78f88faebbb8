"""What fits a device, and how fast: budgets x level policies for one model."""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.errors import ConfigError
from edgemoe.profile import DeviceProfile
from edgemoe.runtime.costmodel import Prediction, predict
from edgemoe.runtime.dual_routing import LevelPolicy
from edgemoe.runtime.offload import budgets as budgets_of
from edgemoe.runtime.offload import memory_plan

POLICIES = ("balanced", "fast", "level-4", "level-8")
FRACTIONS = (0.3, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PlanRow:
    budget: int
    policy: str
    """"balanced"/"fast" (dual routing presets) or "level-N" (forced)."""
    slots: tuple[int, ...]
    """Expert slots per plane: how many experts can hold plane p."""
    peak_bytes: int
    fits: bool
    """Within the profile's usable memory."""
    prediction: Prediction


@dataclass(frozen=True)
class Plan:
    profile: DeviceProfile
    model: str
    n_ctx: int
    min_budget: int
    full_budget: int
    """The smallest budget that keeps every expert plane resident."""
    rows: tuple[PlanRow, ...]
    recommended: PlanRow | None


def _policy(ckpt, name: str) -> LevelPolicy:
    m = ckpt.manifest
    if name.startswith("level-"):
        return LevelPolicy.make(m.plan, m.protected, force_level=int(name[6:]))
    return LevelPolicy.make(m.plan, m.protected, quality=name)


def plan_model(
    ckpt, profile: DeviceProfile, n_ctx: int = 0, n_batch: int = 256
) -> Plan:
    """Rows for budgets of 30/50/75/100% of the expert bytes (plus the minimum
    and the device's usable memory) under each policy; the recommendation is
    dual routing at the largest budget that fits."""
    m = ckpt.manifest
    train = ckpt.spec.n_ctx_train
    if n_ctx > train:
        raise ConfigError(
            f"n_ctx {n_ctx} is larger than the model's context of {train} tokens "
            f"({ckpt.path})"
        )
    n_ctx = n_ctx or min(train, 4096)
    levels = m.plan.levels
    policies = [
        p for p in POLICIES if not p.startswith("level-") or int(p[6:]) in levels
    ]
    sizes = budgets_of(ckpt, n_ctx, n_batch)  # what convert and inspect print
    lo, top = sizes.minimum, sizes.resident[levels[-1]]
    full = memory_plan(ckpt, None, n_ctx, n_batch, None)
    fixed = full.backbone + full.kv_cache + full.scratch
    budgets = {lo, profile.memory_usable}
    budgets.update(int(fixed + f * full.experts) for f in FRACTIONS)
    # The budgets at which each level's experts all stay resident.
    budgets.update(sizes.resident.values())
    budgets = sorted(b for b in budgets if lo <= b <= top)
    rows = []
    for budget in sorted(set(budgets)):
        for name in policies:
            policy = _policy(ckpt, name)
            try:
                quality = "balanced" if name.startswith("level-") else name
                mp = memory_plan(
                    ckpt, budget, n_ctx, n_batch, policy.force_level, quality=quality
                )
            except ConfigError:
                continue  # a forced level needs more than this budget
            # What `edgemoe bench` measures from a fresh load: a prompt, then
            # the decode.
            pred = predict(
                ckpt, profile, policy, mp.slots, resident=mp.resident, cold=True
            )
            rows.append(
                PlanRow(
                    budget,
                    name,
                    mp.slots,
                    mp.total,
                    mp.total <= profile.memory_usable,
                    pred,
                )
            )
    fitting = [r for r in rows if r.fits and r.policy == "balanced"]
    best = max(fitting, key=lambda r: r.budget) if fitting else None
    return Plan(profile, str(ckpt.path), n_ctx, lo, top, tuple(rows), best)
