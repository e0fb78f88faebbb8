"""Live generation figures for the chat panels and ``/stats``: plain dataclasses
built from a model's responses; nothing here imports Textual."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgemoe.runtime.metrics import StepTotals, memory_stats
from edgemoe.units import fmt_size as mib

SPARK_TOKENS = 120
"""Per-token latencies kept for the sparkline."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model holds, for the memory panel and the exit summary."""

    path: str
    levels: tuple[int, ...]
    n_expert: int
    n_ctx: int
    weight_bytes: int
    kv_bytes: int
    quality: Any
    plan: Any = None
    """The converted model's ``MemoryPlan``; None for plain (HF/GGUF) models."""

    @property
    def converted(self) -> bool:
        return self.plan is not None

    @classmethod
    def of(cls, model) -> ModelInfo:
        return cls(
            path=str(model.path),
            levels=tuple(model.levels),
            n_expert=model.spec.n_expert,
            n_ctx=model.n_ctx,
            weight_bytes=int(model.weight_bytes),
            kv_bytes=int(model.cache.nbytes),
            quality=model.options.quality,
            plan=model.memory,
        )


@dataclass(frozen=True)
class LiveStats:
    """One turn's figures so far (or the idle model's memory before any turn)."""

    prompt_tokens: int = 0
    """Prompt tokens evaluated this turn."""
    cached_tokens: int = 0
    """Prompt tokens the previous turn left in the KV cache (not evaluated)."""
    generation_tokens: int = 0
    ttft_s: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    token_ms: tuple[float, ...] = ()
    """The latest per-token latencies, oldest first."""
    stall_fraction: float = 0.0
    """Share of the turn's wall time compute waited on expert reads."""
    hit_rate: Mapping[int, float] = field(default_factory=dict)
    """Expert-plane cache hits by level (bits), for levels that saw traffic."""
    bytes_read: int = 0
    read_per_token: float = 0.0
    """Expert bytes read per processed token (prompt and generated)."""
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    resident_bytes: Mapping[int, int] = field(default_factory=dict)
    """Expert bytes in memory by level."""
    residency: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """Per MoE layer, each expert's resident level (0: not resident)."""
    finish_reason: str | None = None


def residency_of(model) -> tuple[tuple[int, tuple[int, ...]], ...]:
    return tuple((int(i), tuple(int(x) for x in lv)) for i, lv in model.residency())


class StatsTracker:
    """Folds a turn's ``GenerationResponse`` stream into ``LiveStats``.

    Runs on the generating thread, between tokens, where reading the model's
    expert residency is safe; that map is re-read at most every
    ``residency_every`` seconds because it walks every expert."""

    def __init__(self, model, residency_every: float = 0.1):
        self.model = model
        self.every = residency_every
        self.last = None
        self.token_ms: deque[float] = deque(maxlen=SPARK_TOKENS)
        self.totals = StepTotals()
        self.residency = residency_of(model)
        self._residency_t = time.monotonic()

    def feed(self, r) -> None:
        if self.last is not None:
            # generation_s is the decode clock: its step is one token's latency.
            dt = r.timings.generation_s - self.last.timings.generation_s
            if dt > 0:
                self.token_ms.append(dt * 1e3)
        self.last = r
        if r.metrics is not None:
            self.totals.add(r.metrics)

    def snapshot(self, final: bool = False) -> LiveStats:
        now = time.monotonic()
        if final or now - self._residency_t >= self.every:
            self.residency = residency_of(self.model)
            self._residency_t = now
        r = self.last
        if r is None:
            mem = memory_stats()
            return LiveStats(
                rss_bytes=mem.rss_bytes,
                peak_rss_bytes=max(mem.peak_rss_bytes, mem.rss_bytes),
                resident_bytes=dict(zip(self.model.levels, self._resident_now())),
                residency=self.residency,
            )
        t = r.timings
        wall = t.prompt_s + t.generation_s
        tokens = t.prompt_tokens + t.generation_tokens
        tot = self.totals
        rss = tot.rss_bytes or r.memory.rss_bytes
        return LiveStats(
            prompt_tokens=t.prompt_tokens,
            cached_tokens=t.cached_tokens,
            generation_tokens=t.generation_tokens,
            ttft_s=t.ttft_s,
            prompt_tps=t.prompt_tps,
            generation_tps=t.generation_tps,
            token_ms=tuple(self.token_ms),
            stall_fraction=tot.stall_ms / 1e3 / wall if wall > 0 else 0.0,
            hit_rate=tot.hit_rates(),
            bytes_read=tot.bytes_read,
            read_per_token=tot.bytes_read / tokens if tokens else 0.0,
            rss_bytes=rss,
            peak_rss_bytes=max(r.memory.peak_rss_bytes, rss),
            resident_bytes=dict(tot.resident_bytes),
            residency=self.residency,
            finish_reason=r.finish_reason,
        )

    def _resident_now(self) -> list[int]:
        return list(self.model.counters()["resident"])


# -- text shared by /stats, the REPL and the exit summary ------------------------------
def hits_text(live: LiveStats, info: ModelInfo) -> str:
    if not info.converted:
        return "n/a (all experts resident)"
    if not live.hit_rate:
        return "-"
    return " ".join(f"L{lv} {rate:.0%}" for lv, rate in live.hit_rate.items())


def stats_lines(
    last: LiveStats | None, info: ModelInfo, turns: int, now: LiveStats
) -> list[str]:
    """``/stats``: the last turn's speed and streaming, and memory ``now``."""
    lines = [f"model {info.path} · context {info.n_ctx} tokens · {turns} turn(s)"]
    if last is None:
        lines.append("no turns yet")
    else:
        lines += [
            f"last turn: prompt {last.prompt_tokens} tokens at "
            f"{last.prompt_tps:.1f} t/s · generated {last.generation_tokens} at "
            f"{last.generation_tps:.1f} t/s · TTFT {last.ttft_s * 1e3:.0f} ms · "
            f"finish: {last.finish_reason}",
            f"I/O stall {last.stall_fraction:.0%} · hits {hits_text(last, info)} · "
            f"read {last.read_per_token / 2**20:.2f} MiB/token",
        ]
    if info.converted:
        lines.append(f"quality {info.quality}")
    lines.append(memory_line(info, now.rss_bytes, now.peak_rss_bytes))
    return lines


def memory_line(info: ModelInfo, rss: int, peak: int) -> str:
    """llama.cpp-style breakdown in one line (the exit summary too)."""
    p = info.plan
    if p is None:
        parts = [f"weights {mib(info.weight_bytes)}", f"KV cache {mib(info.kv_bytes)}"]
    else:
        budget = mib(p.budget) if p.budget else "none (all experts resident)"
        slots = "/".join(str(s) for s in p.slots)
        parts = [
            f"budget {budget}",
            f"backbone {mib(p.backbone)}",
            f"KV cache {mib(p.kv_cache)}",
            f"scratch {mib(p.scratch + p.runtime)}",
            f"experts {mib(p.experts)} (slots {slots})",
        ]
    return "memory: " + " | ".join([*parts, f"RSS {mib(rss)}", f"peak RSS {mib(peak)}"])
