"""Predicting decode speed of a converted model on a device profile.

A decode token is one step of the whole-step engine (runtime/step.py): one
ggml graph from the embedding to the logits when the experts run inside it
(every plane the policy runs resident, fixed plane counts per rank), else
one graph per stretch between MoE layers: each MoE layer's graph ends after
its router, the host places its experts (runtime/routed.py: levels, cache
lookups, reads and the wait for them, slot ids) and the next graph starts.
So a token costs

- the step's own host work and its first graph (``token_overhead_ms``);
- per host-routed MoE layer, a split: the graph boundary and the placement
  (``layer_overhead_ms``; a resident model has none), and per expert plane
  the host places there (``plane_overhead_ms``: levels, cache lookups, slot
  ids, in Python per expert). In one resident graph a plane's ops cost with
  its bytes;
- the bytes its matvecs stream: the backbone's matrices and the chosen
  experts' planes, at the profile's GB/s per type;
- storage: each plane read costs ``storage_latency_ms`` plus its bytes at
  the random-read rate (in a measured profile both as a decode sees them).
  Reads are charged their full time: the I/O threads share the cores with
  ggml's threads, whose barriers make any delayed thread hold up the graph,
  so reads hide little behind compute.

A measured profile's overheads and read costs are fitted on decodes of
small converted models (edgemoe/commands/probe_costs.py ``runtime_costs``).

Which experts run, at which level, and which planes miss comes from replaying
the routing the converter recorded (consecutive calibration tokens) through
the plane pools.

It predicts decode (``tg``) only: prefill is batched and compute-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.profile import DeviceProfile
from edgemoe.runtime.replay import level_mix, prefetch_trace, replay

MiB = 1 << 20

PREFETCH_EXTRA = 0.10
"""Extra reads next-layer prefetch adds, for models converted before the
converter recorded the prefetch guesses: an estimate (bench_offload's cold
runs on the synthetic model read 22-42% more with prefetch; warm runs add
less, as most guesses are planes the layer asks for anyway)."""


@dataclass(frozen=True)
class Prediction:
    """One configuration's predicted decode cost per token."""

    tokens_per_s: float
    ms_per_token: float
    fixed_ms: float
    """Runtime overhead: per token, and per split (host-routed MoE layer) and
    expert plane placed by the host."""
    backbone_ms: float
    experts_ms: float
    io_ms: float
    """Storage time per token (reads: latency + bytes / random-read rate)."""
    read_per_token: int
    """Bytes read from storage per token."""
    reads_per_token: float
    """Plane reads per token."""
    expert_bytes_per_token: float
    """Expert plane bytes computed per token."""
    plane_runs: float
    """Expert planes computed per token."""
    hit_rate: float
    """Expected plane hit rate."""
    planes_mix: tuple[float, ...]
    """Fraction of chosen experts that run with 1, 2, ... planes."""
    bound: str
    """What dominates: "compute", "storage" or "overhead"."""
    splits: int = 0
    """Host-routed MoE layers per token: the step runs ``splits + 1`` graphs."""


def _type_rate(profile: DeviceProfile, ggml_type: str) -> float:
    """GB/s for a ggml type name; types without a figure use the nearest one."""
    t = ggml_type.lower()
    if t in profile.matmul:
        return profile.matmul[t]
    if t.startswith(("q2", "iq2", "iq1", "q3", "iq3")):
        return profile.matmul["q2_k"]
    if t.startswith(("q4", "q5", "iq4", "q6")):
        return profile.matmul["q4_k"]
    return profile.matmul["q8_0"]


def token_tensors(ckpt):
    """(name, ggml type, shape, bytes) of each stored tensor a decode token
    reads whole: every one but the embedding table, which is a row lookup
    (unless the head shares it)."""
    tied = ckpt.spec.tie_embeddings
    for name in ckpt.names():
        if name == "token_embd.weight" and not tied:
            continue
        yield (name, *ckpt.info(name)[:3])


def backbone_ms(ckpt, profile: DeviceProfile) -> float:
    """Time for the backbone matrices one token streams (``token_tensors``)."""
    ms = 0.0
    for _, ggml_type, shape, n in token_tensors(ckpt):
        if len(shape) < 2:
            continue  # norms and biases: negligible
        ms += n / (_type_rate(profile, ggml_type) * 1e9) * 1e3
    return ms


def all_resident(ckpt, slots: tuple[int, ...] | None) -> bool:
    """Whether ``slots`` keep every plane they hold resident: None, or each
    pool full or empty (a memory plan's ``resident`` says it exactly)."""
    n_total = len(ckpt.manifest.moe_layers) * ckpt.spec.n_expert
    return slots is None or all(s == 0 or s >= n_total for s in slots)


def host_routed(ckpt, policy, resident: bool) -> int:
    """MoE layers whose graph ends for the host to place experts, as the
    runtime sets it up (offload.setup): none when every plane the policy
    runs is ``resident`` and the policy gives fixed plane counts per rank;
    else every MoE layer."""
    fixed = policy.counts(ckpt.spec.n_expert_used) is not None
    return 0 if resident and fixed else len(ckpt.manifest.moe_layers)


def predict(
    ckpt,
    profile: DeviceProfile,
    policy,
    slots: tuple[int, ...] | None,
    prefetch: bool = True,
    resident: bool | None = None,
    cold: bool = False,
) -> Prediction:
    """Decode cost per token of ``ckpt`` on ``profile`` with dual-routing
    ``policy`` and ``slots`` expert slots per plane (None: all resident);
    ``resident``: the memory plan's (a budget just under the resident one
    fills every pool yet streams; None: judged from ``slots``); ``cold``:
    decode after a prompt from a fresh load, as ``edgemoe bench`` runs it
    (see ``replay``), else from a warm cache."""
    m = ckpt.manifest
    planes = m.plan.planes
    shapes = ckpt.plane_shapes()
    plane_bytes = np.array(
        [sum(bt.row_bytes(kk) * n for n, kk in shapes.values()) for bt in planes]
    )
    plane_ms = plane_bytes / np.array(
        [_type_rate(profile, bt.name) * 1e9 for bt in planes]
    ) * 1e3  # fmt: skip
    recorded = any(g is not None for g in prefetch_trace(ckpt))
    if resident is None:
        resident = all_resident(ckpt, slots)
    # A resident plan loads every plane at load: no cold start.
    r = replay(
        ckpt, policy, slots, prefetch=prefetch and recorded, cold=cold and not resident
    )
    guessed = prefetch and not recorded and slots is not None
    reads = r.reads * (1 + PREFETCH_EXTRA if guessed else 1)
    reads[0] += r.prefetched
    read_bytes = float((reads * plane_bytes).sum())
    expert_ms = float((r.runs * plane_ms).sum())
    bb_ms = backbone_ms(ckpt, profile)
    splits = host_routed(ckpt, policy, resident)
    placed = float(r.runs.sum()) if splits else 0.0  # planes the host places
    fixed_ms = (
        profile.token_overhead_ms
        + splits * profile.layer_overhead_ms
        + placed * profile.plane_overhead_ms
    )
    io_ms = (
        float(reads.sum()) * profile.storage_latency_ms
        + read_bytes / (profile.storage_rand_read * 1e6) * 1e3
    )
    total = fixed_ms + bb_ms + expert_ms + io_ms
    parts = {"overhead": fixed_ms, "compute": bb_ms + expert_ms, "storage": io_ms}
    wanted = float(r.wanted.sum())
    mix = level_mix(ckpt, policy).mean(axis=0)[1:]
    return Prediction(
        tokens_per_s=1e3 / total,
        ms_per_token=total,
        fixed_ms=fixed_ms,
        backbone_ms=bb_ms,
        experts_ms=expert_ms,
        io_ms=io_ms,
        read_per_token=int(read_bytes),
        reads_per_token=float(reads.sum()),
        expert_bytes_per_token=float((r.runs * plane_bytes).sum()),
        plane_runs=float(r.runs.sum()),
        hit_rate=1.0 - float(r.reads.sum()) / wanted if wanted else 1.0,
        planes_mix=tuple(float(x) for x in mix),
        bound=max(parts, key=parts.get),
        splits=splits,
    )
