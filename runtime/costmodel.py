"""Predicting decode speed of a converted model on a device profile.

Per token, the compute thread does a fixed amount of work per layer (graphs,
attention and routing glue: the profile's ``layer_overhead_ms``), streams the
backbone's matrices and the chosen experts' planes through ggml matvecs (the
profile's GB/s per type), and reads the planes it misses from storage. The
planes each chosen expert runs come from dual routing applied to the sorted
routing weights the converter sampled; which planes miss comes from a static
hot set: a plane pool of S slots holds the S (layer, expert) planes with the
most demand (calibration hotness). HEBF overlaps reads with expert compute;
the synchronous baseline does not.

It predicts decode (``tg``) only: prefill is batched and compute-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.profile import DeviceProfile

MiB = 1 << 20


@dataclass(frozen=True)
class Prediction:
    """One configuration's predicted decode cost per token."""

    tokens_per_s: float
    ms_per_token: float
    fixed_ms: float
    backbone_ms: float
    experts_ms: float
    io_ms: float
    """Storage time per token, before overlap."""
    exposed_io_ms: float
    """The part of io_ms that compute could not hide."""
    read_per_token: int
    """Bytes read from storage per token."""
    expert_bytes_per_token: float
    """Expert plane bytes computed per token."""
    hit_rate: float
    """Expected plane hit rate."""
    planes_mix: tuple[float, ...]
    """Fraction of chosen experts that run with 1, 2, ... planes."""
    bound: str
    """What dominates: "compute", "storage" or "overhead"."""


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


def backbone_cost(ckpt, profile: DeviceProfile) -> tuple[float, int]:
    """(ms, bytes) of the backbone matrices one token streams: every weight but
    the embedding table, which is a row lookup (unless the head shares it)."""
    ms, nbytes = 0.0, 0
    tied = ckpt.spec.tie_embeddings
    for name in ckpt.names():
        if name == "token_embd.weight" and not tied:
            continue
        ggml_type, shape, n = ckpt.info(name)
        if len(shape) < 2:
            continue  # norms and biases: negligible
        ms += n / (_type_rate(profile, ggml_type) * 1e9) * 1e3
        nbytes += n
    return ms, nbytes


def level_mix(ckpt, policy) -> np.ndarray:
    """[L, P+1] fraction of each MoE layer's chosen experts that run n planes
    (column n), from the converter's sample of sorted routing weights."""
    m = ckpt.manifest
    k = ckpt.spec.n_expert_used
    top = len(m.plan.planes)
    ranked_all = m.calibration.get("rank_weights") or []
    out = []
    for i, layer in enumerate(m.moe_layers):
        ranked = np.asarray(ranked_all[layer] if layer < len(ranked_all) else [])
        if ranked.ndim != 2 or ranked.shape[1] != k or ranked.shape[0] == 0:
            # No sample (converted before it was recorded): equal weights.
            ranked = np.full((1, k), 1.0 / k)
        ids = np.full(ranked.shape, -1, dtype=np.int64)  # protected: below
        planes = policy.planes(layer, ids, ranked)  # [S, K]
        mix = np.bincount(planes.reshape(-1), minlength=top + 1) / planes.size
        # Protected experts always run every plane: move their share to the top.
        hot = m.hotness[layer]
        prot = sum(hot[e].freq for e in m.protected[layer]) / k if hot else 0.0
        mix = mix * (1 - prot)
        mix[top] += prot
        out.append(mix)
    return np.asarray(out)


def _hit_rates(ckpt, need: np.ndarray, slots: tuple[int, ...] | None) -> np.ndarray:
    """[L, P] expected hit rate of plane p in layer l: the pool of plane p
    holds the planes with the most demand (freq x share needing plane p)."""
    m = ckpt.manifest
    n_l, n_p = need.shape
    if slots is None:
        return np.ones((n_l, n_p))
    freq = np.array(
        [[h.freq for h in m.hotness[layer]] for layer in m.moe_layers]
    )  # [L, E]
    hits = np.zeros((n_l, n_p))
    for p in range(n_p):
        demand = freq * need[:, p : p + 1]  # [L, E]
        flat = demand.reshape(-1)
        total = flat.sum()
        if total <= 0:
            hits[:, p] = 1.0
            continue
        keep = np.zeros(flat.size, dtype=bool)
        keep[np.argsort(-flat, kind="stable")[: slots[p]]] = True
        kept = (demand * keep.reshape(demand.shape)).sum(axis=1)
        hits[:, p] = np.where(demand.sum(axis=1) > 0, kept / demand.sum(axis=1), 1.0)
    return hits


def predict(
    ckpt,
    profile: DeviceProfile,
    policy,
    slots: tuple[int, ...] | None,
    pipeline: str = "waves",
    prefetch: bool = True,
) -> Prediction:
    """Decode cost per token of ``ckpt`` on ``profile`` with dual-routing
    ``policy`` and ``slots`` expert slots per plane (None: all resident)."""
    m = ckpt.manifest
    spec = ckpt.spec
    k = spec.n_expert_used
    planes = m.plan.planes
    n_p = len(planes)
    shapes = ckpt.plane_shapes()
    plane_bytes = np.array(
        [sum(bt.row_bytes(kk) * n for n, kk in shapes.values()) for bt in planes]
    )
    plane_ms = np.array(
        [
            b / (_type_rate(profile, bt.name) * 1e9) * 1e3
            for b, bt in zip(plane_bytes, planes)
        ]
    )
    mix = level_mix(ckpt, policy)  # [L, P+1]
    # Share of chosen experts that need plane p: those running more than p planes.
    need = np.stack([mix[:, p + 1 :].sum(axis=1) for p in range(n_p)], axis=1)
    hits = _hit_rates(ckpt, need, slots)  # [L, P]
    forced = policy.force_level is not None
    # Dual routing runs a missing upper plane's expert at its resident level
    # and fetches the plane for later; plane 1 (or a forced level) must wait.
    ran = need.copy()
    if not forced:
        ran[:, 1:] = need[:, 1:] * np.cumprod(hits, axis=1)[:, 1:]
    reads = need * (1 - hits) * k  # [L, P] plane reads per layer and token
    if prefetch and slots is not None:
        # Prefetch guesses the next layer's plane-1 experts; about half the
        # guesses are used (measured 50-56%), so it reads about as much again.
        reads[:, 0] *= 2.0
    n_reads = float(reads.sum())
    read_bytes = float((reads * plane_bytes).sum())
    expert_ms = float((ran * k * plane_ms).sum())
    expert_bytes = float((ran * k * plane_bytes).sum())
    backbone_ms, _ = backbone_cost(ckpt, profile)
    fixed_ms = spec.n_layer * profile.layer_overhead_ms
    io_ms = (
        n_reads * profile.storage_latency_ms
        + read_bytes / (profile.storage_rand_read * 1e6) * 1e3
    )
    overlap = expert_ms if pipeline == "waves" else 0.0
    exposed = max(0.0, io_ms - overlap)
    total = fixed_ms + backbone_ms + expert_ms + exposed
    demand = float((need * k).sum())
    hit = float((need * k * hits).sum() / demand) if demand else 1.0
    parts = {
        "overhead": fixed_ms,
        "compute": backbone_ms + expert_ms,
        "storage": exposed,
    }
    return Prediction(
        tokens_per_s=1e3 / total,
        ms_per_token=total,
        fixed_ms=fixed_ms,
        backbone_ms=backbone_ms,
        experts_ms=expert_ms,
        io_ms=io_ms,
        exposed_io_ms=exposed,
        read_per_token=int(read_bytes),
        expert_bytes_per_token=expert_bytes,
        hit_rate=hit,
        planes_mix=tuple(float(x) for x in mix.mean(axis=0)[1:]),
        bound=max(parts, key=parts.get),
    )
