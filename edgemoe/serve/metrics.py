"""``/metrics``: the scheduler's totals and the expert cache's counters in
Prometheus' text format (names prefixed ``edgemoe_``)."""

from __future__ import annotations


def prometheus_text(scheduler, levels: tuple[int, ...]) -> str:
    """``scheduler``: the server's ``Scheduler`` (its totals and queue);
    ``levels``: the model's expert levels in bits, which label the per-level
    series."""
    from edgemoe.runtime.metrics import rss_bytes

    out: list[str] = []

    def metric(name: str, kind: str, doc: str, samples) -> None:
        out.append(f"# HELP edgemoe_{name} {doc}")
        out.append(f"# TYPE edgemoe_{name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            out.append(
                f"edgemoe_{name}{{{lab}}} {value}" if lab else f"edgemoe_{name} {value}"
            )

    t = scheduler.totals
    c = t.counters or {}
    metric(
        "requests_total",
        "counter",
        "Finished requests by finish reason.",
        [({"finish": k}, v) for k, v in sorted(t.requests.items())] or [({}, 0)],
    )
    metric(
        "requests_running", "gauge", "Requests decoding now.", [({}, scheduler.running)]
    )
    metric(
        "requests_queued",
        "gauge",
        "Requests waiting for a slot.",
        [({}, scheduler.queued)],
    )
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens evaluated.",
        [({}, t.prompt_tokens)],
    )
    metric(
        "cached_prompt_tokens_total",
        "counter",
        "Prompt tokens reused from an earlier request's sequence.",
        [({}, t.cached_tokens)],
    )
    metric(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        [({}, t.generated_tokens)],
    )
    metric("steps_total", "counter", "Batched steps run.", [({}, t.steps)])
    metric(
        "step_seconds_total",
        "counter",
        "Time in batched steps.",
        [({}, round(t.step_s, 6))],
    )
    tps = t.generated_tokens / t.step_s if t.step_s > 0 else 0.0
    metric(
        "generated_tokens_per_second",
        "gauge",
        "Generated tokens over the time spent in steps, since start.",
        [({}, round(tps, 3))],
    )
    by_level = [
        ("hits", "expert_plane_hits_total", "Expert planes found in memory."),
        ("misses", "expert_plane_misses_total", "Expert planes read from disk."),
        ("resident", "expert_resident_bytes", "Expert bytes in memory."),
    ]
    for key, name, doc in by_level:
        values = c.get(key) or [0] * len(levels)
        kind = "gauge" if key == "resident" else "counter"
        metric(
            name,
            kind,
            doc + " By level (bits).",
            [({"level": lv}, v) for lv, v in zip(levels, values)],
        )
    metric(
        "expert_bytes_read_total",
        "counter",
        "Expert bytes read from disk.",
        [({}, c.get("bytes_read", 0))],
    )
    metric(
        "expert_stall_seconds_total",
        "counter",
        "Time compute waited on reads.",
        [({}, round(c.get("stall_s", 0.0), 6))],
    )
    metric(
        "rss_bytes", "gauge", "Resident set size of the server.", [({}, rss_bytes())]
    )
    return "\n".join(out) + "\n"
