"""Setting up a converted model's routed experts: the budget split, the slot
cache, the I/O queue and dual routing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.errors import ConfigError
from edgemoe.runtime.budget import fmt_size, parse_size, plan_slots


@dataclass(frozen=True)
class MemoryPlan:
    """What the budget holds, in bytes."""

    budget: int | None
    backbone: int
    kv_cache: int
    scratch: int
    runtime: int
    """Measured: what opening the checkpoint and tokenizer grew the process by."""
    experts: int
    slots: tuple[int, ...]
    """Per plane, how many (layer, expert) planes it holds."""
    resident: bool = True
    """Every plane the policy runs is loaded at start (runtime/resident.py);
    else planes stream through ``slots`` under the budget."""

    @property
    def total(self) -> int:
        return (
            self.backbone + self.kv_cache + self.scratch + self.runtime + self.experts
        )


@dataclass(frozen=True)
class Budgets:
    """The budgets a converted model needs at a context: what convert,
    inspect and profile print and what load enforces, from one function."""

    n_ctx: int
    minimum: int
    """The smallest ``--budget`` that runs it (experts stream)."""
    resident: dict[int, int]
    """Per level, the smallest ``--budget`` that keeps that level's experts
    resident (in-memory speed)."""


def budgets(ckpt, n_ctx: int = 0, n_batch: int = 256, kv_type: str = "f32") -> Budgets:
    """``Budgets`` of a converted model, as load computes them (``memory_plan``);
    ``n_ctx`` 0: load's default (the model's context, at most 4096)."""
    n_ctx = n_ctx or min(ckpt.spec.n_ctx_train, 4096)
    return Budgets(
        n_ctx,
        min_budget(ckpt, n_ctx, n_batch, None, kv_type),
        {
            lv: resident_budget(ckpt, n_ctx, n_batch, lv, kv_type=kv_type)
            for lv in ckpt.manifest.levels
        },
    )


def kv_bytes(spec, n_ctx: int, kv_type: str = "f32") -> int:
    from edgemoe.runtime.kv import KV_TYPES, cache_dims

    size = np.dtype(KV_TYPES[kv_type][0]).itemsize
    return spec.n_layer * n_ctx * sum(cache_dims(spec)) * size


def scratch_bytes(spec, n_ctx: int, n_batch: int, ffn: int) -> int:
    """Compute scratch for one prefill step of ``n_batch`` tokens (no more
    than the context holds): the routed graph's intermediates, the
    workspace, attention scores, logits rows."""
    t, k, d = min(n_batch, n_ctx), max(spec.n_expert_used, 1), spec.n_embd
    routed = (3 * ffn * k + 3 * d * k + 2 * d) * t
    attention = spec.n_head * t * n_ctx * 2
    workspace = t * (8 * d + 4 * spec.n_head * spec.head_dim + 4 * k)
    return 4 * (routed + attention + workspace + t * spec.n_vocab) + (8 << 20)


def min_budget(
    ckpt,
    n_ctx: int,
    n_batch: int,
    force_level: int | None = None,
    kv_type: str = "f32",
) -> int:
    """The smallest budget that runs ``ckpt``: backbone, KV cache, scratch and
    one token's experts (plus the zero slots, and at a forced level the
    protected experts' planes above it)."""
    m = ckpt.manifest
    plane = plane_bytes(ckpt)
    fixed = _fixed(ckpt, n_ctx, n_batch, kv_type)
    need = 1 if force_level is None else m.plan.n_planes(force_level)
    k = ckpt.spec.n_expert_used
    above = 0  # a forced level still runs protected experts at the top
    if force_level is not None:
        above = sum(len(e) for e in m.protected) * sum(plane[need:])
    return fixed + sum(plane) + k * sum(plane[:need]) + above


PAGE = 4096


def backbone_bytes(ckpt, n_ctx: int) -> int:
    """Backbone bytes a sequence keeps in memory: all of the file, read at
    load, but the token embedding table, whose rows are read from the file
    one per token. Read rows are clean page-cache pages the kernel can evict,
    so the table counts the pages ``n_ctx`` rows can touch; a table that is
    also the output head is loaded and read whole every token."""
    total = ckpt.manifest.backbone.bytes
    if ckpt.spec.tie_embeddings:
        return total
    _, shape, size = ckpt.info("token_embd.weight")[:3]
    row = size // shape[0]
    touched = n_ctx * (-(-row // PAGE) + 1) * PAGE  # a row may straddle a page
    return total - size + min(size, touched)


def plane_bytes(ckpt) -> tuple[int, ...]:
    """Bytes of one expert's plane p (gate + up + down), per plane."""
    shapes = ckpt.plane_shapes()
    return tuple(
        sum(bt.row_bytes(kk) * n for n, kk in shapes.values())
        for bt in ckpt.manifest.plan.planes
    )


def _fixed(ckpt, n_ctx: int, n_batch: int, kv_type: str = "f32") -> int:
    spec = ckpt.spec
    return (
        backbone_bytes(ckpt, n_ctx)
        + kv_bytes(spec, n_ctx, kv_type)
        + scratch_bytes(spec, n_ctx, n_batch, ckpt.manifest.expert_ffn)
    )


def resident_budget(
    ckpt,
    n_ctx: int,
    n_batch: int,
    force_level=None,
    quality="balanced",
    runtime=0,
    kv_type: str = "f32",
) -> int:
    """The smallest budget that keeps every plane the policy runs resident
    (no streaming: in-memory speed), the load's staging array included."""
    from edgemoe.runtime.resident import staging_bytes

    used = _planes_used(ckpt, force_level, quality)
    plane = plane_bytes(ckpt)
    return (
        _fixed(ckpt, n_ctx, n_batch, kv_type)
        + runtime
        + _resident_experts(ckpt, used)
        + staging_bytes(ckpt.spec.n_expert, plane[:used])
    )


def _planes_used(ckpt, force_level, quality) -> int:
    from edgemoe.runtime.dual_routing import LevelPolicy

    m = ckpt.manifest
    policy = LevelPolicy.make(m.plan, m.protected, quality, force_level)
    return policy.planes_used(ckpt.spec.n_expert_used)


def _resident_experts(ckpt, n_planes: int) -> int:
    """Bytes of the first ``n_planes`` planes of every expert, held per MoE
    layer with a zero slot each (runtime/resident.py)."""
    n = len(ckpt.manifest.moe_layers) * (ckpt.spec.n_expert + 1)
    return n * sum(plane_bytes(ckpt)[:n_planes])


def memory_plan(
    ckpt,
    budget,
    n_ctx: int,
    n_batch: int,
    force_level: int | None,
    runtime: int = 0,
    quality="balanced",
    kv_type: str = "f32",
) -> MemoryPlan:
    """How ``budget`` is spent (None: every expert plane resident). A budget
    that holds every plane the policy (``force_level``, ``quality``) runs,
    plus the load's staging, keeps them all resident; a smaller one streams
    them through slots per plane."""
    from edgemoe.runtime.dual_routing import LevelPolicy

    m = ckpt.manifest
    spec = ckpt.spec
    plane = plane_bytes(ckpt)
    n_total = len(m.moe_layers) * spec.n_expert
    fixed_parts = (
        backbone_bytes(ckpt, n_ctx),
        kv_bytes(spec, n_ctx, kv_type),
        scratch_bytes(spec, n_ctx, n_batch, m.expert_ffn),
        runtime,
    )

    def resident(n: int) -> MemoryPlan:
        slots = (n_total,) * n + (0,) * (len(plane) - n)
        experts = _resident_experts(ckpt, n)
        return MemoryPlan(total_budget, *fixed_parts, experts, slots)

    if budget is None:
        total_budget = None
        return resident(len(plane))
    total_budget = parse_size(budget)
    fits = resident_budget(ckpt, n_ctx, n_batch, force_level, quality, runtime, kv_type)
    if total_budget >= fits:
        return resident(_planes_used(ckpt, force_level, quality))
    policy = LevelPolicy.make(m.plan, m.protected, quality, force_level)
    need = 1 if force_level is None else m.plan.n_planes(force_level)
    counts = policy.counts(spec.n_expert_used)
    try:
        slots = plan_slots(
            total_budget,
            sum(fixed_parts),
            plane,
            n_total,
            spec.n_expert_used,
            need,
            forced=force_level is not None,
            protected=sum(len(e) for e in m.protected),
            # A preset's pools follow its shares: balanced never runs plane 3.
            shares=None if counts is None else tuple(c / counts[0] for c in counts),
        )
    except ValueError:
        minimum = min_budget(ckpt, n_ctx, n_batch, force_level, kv_type) + runtime
        slots = minimum - sum(fixed_parts) - runtime
        level = m.plan.levels[need - 1]
        raise ConfigError(
            f"budget {fmt_size(total_budget)} ({total_budget} bytes) is below "
            f"the minimum {fmt_size(minimum)} ({minimum} bytes) for "
            f"{ckpt.path} at a {n_ctx}-token context: backbone "
            f"{fmt_size(fixed_parts[0])}, KV cache {fmt_size(fixed_parts[1])}, "
            f"compute scratch {fmt_size(fixed_parts[2])} ({n_batch}-token "
            f"batches), runtime {fmt_size(runtime)}, expert slots "
            f"{fmt_size(slots)} ({spec.n_expert_used} experts per token, "
            f"{fmt_size(sum(plane[:need]))} each at level {level}); a shorter "
            "context (-c) shrinks the KV cache and scratch, a smaller batch (-b) "
            "the scratch" + (", a lower --level the expert slots" if need > 1 else "")
        ) from None
    experts = sum((s + 1) * b for s, b in zip(slots, plane))
    return MemoryPlan(total_budget, *fixed_parts, experts, slots, resident=False)


def setup(model, ckpt, options, plan: MemoryPlan):
    """The routed-experts machinery for a converted model; returns
    (experts(layer) for build_layers, the CachedRouted)."""
    from edgemoe.runtime.dual_routing import LevelPolicy
    from edgemoe.runtime.expert_cache import PlaneCache
    from edgemoe.runtime.io_queue import get_io_backend
    from edgemoe.runtime.layers import to_f32
    from edgemoe.runtime.resident import ResidentPlanes
    from edgemoe.runtime.routed import CachedRouted

    m = ckpt.manifest
    policy = LevelPolicy.make(m.plan, m.protected, options.quality, options.force_level)
    cache_ref: list = []
    io = get_io_backend(
        options.io,
        options.io_threads,
        on_done=lambda req: cache_ref[0].notify(req),
        throttle=options.throttle,
        probe=ckpt.root / m.shards[0].file if m.shards else None,
    )
    if plan.resident:
        cache = ResidentPlanes(
            ckpt,
            model.weights,
            io,
            sum(1 for s in plan.slots if s),
            verify=options.verify,
            repack=options.repack,
        )
    else:
        store = options.slot_store
        if store == "auto":
            store = "host" if model.device.is_host else "device"
        cache = PlaneCache(
            ckpt,
            model.weights,
            plan.slots,
            io,
            verify=options.verify,
            eviction=options.eviction,
            store=store,
        )
    cache_ref.append(cache)
    io.start()
    streams = not plan.resident
    routers = {}
    if options.prefetch and streams:
        for layer in m.moe_layers:
            # A copy: the backbone's bytes may be released once repacked.
            w = np.array(
                to_f32(ckpt.load(f"blk.{layer}.ffn_gate_inp.weight")).data,
                dtype=np.float32,
                order="C",
            )
            b = f"blk.{layer}.ffn_gate_inp.bias"
            bias = ckpt.load(b).to_float32().copy() if b in ckpt.names() else 0.0
            routers[layer] = (w, bias)
    routed = CachedRouted(
        cache,
        policy,
        routers,
        m.shifts,
        prefetch=options.prefetch and streams,
        resident=plan.resident and policy.counts(ckpt.spec.n_expert_used) is not None,
        in_memory=plan.resident,
    )
    return routed.experts_for, routed
