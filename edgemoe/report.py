"""What ``edgemoe inspect`` and ``edgemoe convert`` report: dicts for --json,
and the same as aligned text for people."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgemoe.errors import ModelFileError
from edgemoe.units import fmt_size as mib
from edgemoe.units import mib as _mib
from edgemoe.units import mib_up


def inspect_report(path: str, verify: bool = False) -> dict[str, Any]:
    """Architecture, sizes and tensors of an HF, GGUF or EdgeMoE model.

    ``verify`` re-hashes an EdgeMoE model's files against its manifest.
    """
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.checkpoint.base import is_expert_matrix

    ckpt = open_checkpoint(path)
    try:
        spec = ckpt.spec
        tensors, params, expert_params, stored = [], 0, 0, 0
        for name in ckpt.names():
            dtype, shape, nbytes = ckpt.info(name)
            n = 1
            for d in shape:
                n *= d
            params += n
            stored += nbytes
            if is_expert_matrix(name):
                expert_params += n
            tensors.append(
                {"name": name, "type": dtype, "shape": list(shape), "bytes": nbytes}
            )
        manifest = getattr(ckpt, "manifest", None)
        if manifest is not None:
            # Routed experts live in the shards, counted at the model's true size.
            expert_params = (
                3
                * spec.n_expert
                * spec.expert_ffn
                * spec.n_embd
                * len(manifest.moe_layers)
            )
            params += expert_params
        active = params - expert_params
        if spec.n_expert:
            active += expert_params * spec.n_expert_used // spec.n_expert
        p = Path(path)
        files = [p] if p.is_file() else [f for f in p.iterdir() if f.is_file()]
        fmt = "gguf" if p.is_file() else "hf-safetensors"
        rep: dict[str, Any] = {
            "path": str(p),
            "format": "edgemoe" if manifest is not None else fmt,
            "architecture": ckpt.architecture,
            "family": spec.family,
            "spec": dataclasses.asdict(spec),
            "parameters": params,
            "expert_parameters": expert_params,
            "active_parameters": active,
            "weight_bytes": stored,
            "file_bytes": sum(f.stat().st_size for f in files),
            "tensors": tensors,
        }
        if manifest is not None:
            rep.update(_edgemoe_report(ckpt, verify))
        return rep
    finally:
        ckpt.close()


def _edgemoe_report(ckpt, verify: bool) -> dict[str, Any]:
    m = ckpt.manifest
    spec = ckpt.spec
    level_bytes = ckpt.level_bytes()
    n_weights = 3 * spec.expert_ffn * spec.n_embd * spec.n_expert * len(m.moe_layers)
    from edgemoe.runtime.offload import budgets

    b = budgets(ckpt)
    rep: dict[str, Any] = {
        "version": m.version,
        "min_budget_bytes": b.minimum,
        "min_budget_context": b.n_ctx,
        "resident_budget_bytes": {str(lv): n for lv, n in b.resident.items()},
        "levels": list(m.levels),
        "plane_types": [p.name for p in m.plan.planes],
        "backbone_type": m.backbone_type,
        "backbone_bytes": m.backbone.bytes,
        "expert_bytes": {str(lv): b for lv, b in level_bytes.items()},
        "expert_bits_per_weight": {
            str(lv): round(8 * b / n_weights, 3) for lv, b in level_bytes.items()
        },
        "protected_experts": {
            str(i): list(row) for i, row in enumerate(m.protected) if row
        },
        "hotness": [[dataclasses.asdict(h) for h in row] for row in m.hotness],
        "calibration": m.calibration,
        "shards": [dataclasses.asdict(s) for s in m.shards],
    }
    if verify:
        from edgemoe.format.writer import sha256_of

        for ref in (m.backbone, *m.shards):
            got = sha256_of(ckpt.root / ref.file)
            if got != ref.sha256:
                raise ModelFileError(
                    ckpt.root / ref.file,
                    f"sha256 {got[:16]}... does not match the manifest's "
                    f"{ref.sha256[:16]}...: the file is corrupt",
                )
        rep["verified"] = True
    return rep


def print_inspect(rep: dict[str, Any], tensors: bool = False) -> None:
    s = rep["spec"]
    print(f"model        {rep['path']} ({rep['format']})")
    print(f"architecture {rep['architecture']} (family {rep['family']})")
    print(
        f"parameters   {rep['parameters'] / 1e6:,.1f} M total, "
        f"{rep['active_parameters'] / 1e6:,.1f} M active per token, "
        f"experts {rep['expert_parameters'] / 1e6:,.1f} M"
    )
    stored, files = mib(rep["weight_bytes"]), mib(rep["file_bytes"])
    if rep["format"] == "edgemoe":  # weight_bytes: the backbone's file
        planes = mib(rep["expert_bytes"][str(rep["levels"][-1])])
        stored = f"backbone {stored} + expert planes {planes}"
    print(f"weights      {stored} stored, files {files}")
    moe = sum(s["moe_layers"])
    if s["attention"] == "mla":  # every head reads one cached latent
        heads = (
            f"MLA {s['n_head']} heads × ({s['qk_nope_dim']} + {s['head_dim']} RoPE), "
            f"latent {s['kv_lora_rank']}"
        )
    else:
        heads = f"heads {s['n_head']}/{s['n_head_kv']} × {s['head_dim']}"
    print(
        f"shape        {s['n_layer']} layers ({moe} MoE) · hidden {s['n_embd']} · "
        f"{heads} · vocab {s['n_vocab']} · context {s['n_ctx_train']}"
    )
    notes = [
        (
            f"window {s['sliding_window']} on {sum(s['swa_layers'])} of "
            f"{s['n_layer']} layers"
        )
        if s["swa_layers"]
        else "",
        "attention sinks" if s["attn_sinks"] else "",
        f"YaRN ×{s['rope_factor']:g}" if s["rope_scaling"] == "yarn" else "",
        f"routing {s['router']}"
        + (f", {s['topk_group']} of {s['n_group']} groups" if s["n_group"] > 1 else ""),
    ]
    print("math         " + " · ".join(n for n in notes if n))
    if s["n_expert"]:
        shared = (
            f" · shared expert FFN {s['shared_expert_ffn']}"
            if s["shared_expert_ffn"]
            else ""
        )
        print(
            f"experts      {s['n_expert']} per layer, {s['n_expert_used']} active, "
            f"FFN {s['expert_ffn']}{shared}"
        )
    if rep["format"] == "edgemoe":
        print(f"backbone     {rep['backbone_type']}, {mib(rep['backbone_bytes'])}")
        planes = " + ".join(rep["plane_types"])
        print(f"levels       {rep['levels']} bits, planes {planes}")
        print(
            f"min budget   {mib_up(rep['min_budget_bytes'])} at a "
            f"{rep['min_budget_context']}-token context (--budget; experts stream)"
        )
        for lv, b in rep["expert_bytes"].items():
            bpw = rep["expert_bits_per_weight"][lv]
            print(
                f"  level {lv:>2}: all experts {mib(b)} ({bpw} bits per weight), "
                f"resident from {mib_up(rep['resident_budget_bytes'][lv])}"
            )
        prot = rep["protected_experts"]
        if prot:
            print(
                "protected    " + ", ".join(f"layer {k}: {v}" for k, v in prot.items())
            )
        if rep.get("verified"):
            print("checksums    every file matches its sha256 in manifest.json")
    if tensors:
        for t in rep["tensors"]:
            shape = str(t["shape"])
            print(f"  {t['name']:<40} {t['type']:<8} {shape:<22} {t['bytes']:>12,}")


def _profiles() -> list[tuple[str, int]]:
    """(name, usable bytes) of the packaged device profiles."""
    from edgemoe.profile import load_profile, profile_names

    return [(n, load_profile(n).memory_usable) for n in profile_names(user=False)]


def _which(names: list[str], n_all: int) -> str:
    if len(names) == n_all:
        return f"all {n_all} device profiles"
    return ", ".join(names) or "no device profile"


def print_convert_summary(report) -> None:
    """The table ``edgemoe convert`` ends with: bytes per level, bits per
    weight, and the memory each level needs with every expert resident."""
    from rich.console import Console
    from rich.table import Table

    from edgemoe.format.reader import EdgeCheckpoint
    from edgemoe.runtime.offload import budgets

    m = report.manifest
    spec = m.spec
    ckpt = EdgeCheckpoint(report.out)
    try:
        b = budgets(ckpt)  # the numbers inspect, profile and load use
    finally:
        ckpt.close()
    n_weights = 3 * spec.expert_ffn * spec.n_embd * spec.n_expert * len(m.moe_layers)
    table = Table(title=f"{report.out} ({report.seconds:.1f} s)")
    for col in ("level", "experts", "bits/weight", "resident from"):
        table.add_column(col, justify="right")
    table.add_column("every expert resident on", justify="left")
    profiles = _profiles()
    for lv, size in report.level_bytes.items():
        need = b.resident[lv]
        table.add_row(
            f"{lv}-bit",
            mib(size),
            f"{8 * size / n_weights:.2f}",
            mib_up(need),
            _which([n for n, usable in profiles if usable >= need], len(profiles)),
        )
    console = Console()
    console.print(table)
    planes = " + ".join(p.name for p in m.plan.planes)
    console.print(
        f"backbone {m.backbone_type} {mib(report.backbone_bytes)}; planes {planes}; "
        f"{len(m.shards)} expert shard(s), sha256 in manifest.json; calibration "
        f"{m.calibration.get('tokens')} tokens ({m.calibration.get('file')})"
    )
    prot = [f"layer {i}: {list(r)}" for i, r in enumerate(m.protected) if r]
    if prot:
        console.print("protected (super) experts, always top level: " + "; ".join(prot))
    fits = _which([n for n, usable in profiles if usable >= b.minimum], len(profiles))
    console.print(
        f"budgets at a {b.n_ctx}-token context: resident from the table's "
        f"figure (--budget at least that, in-memory speed); experts stream from "
        f"{mib_up(b.minimum)}, which fits: {fits}; edgemoe profile -m "
        f"{report.out} plans it",
        soft_wrap=True,
    )


def stats_line(timings) -> str:
    """llama-cli's per-turn summary, which users grep for."""
    return (
        f"[ Prompt: {timings.prompt_tps:.1f} t/s | "
        f"Generation: {timings.generation_tps:.1f} t/s ]"
    )


def offload_line(totals, budget: int, timings) -> str:
    """Expert streaming over a generation (``StepTotals``): reads, stall and
    hits by level."""
    wall = timings.prompt_s + timings.generation_s
    per = " ".join(f"L{lv} {r:.0%}" for lv, r in totals.hit_rates().items())
    tokens = max(timings.prompt_tokens + timings.generation_tokens, 1)
    read = totals.bytes_read
    return (
        f"experts: budget {_mib(budget)} · read {_mib(read)} "
        f"({read / tokens / 2**20:.1f} MiB/token) · "
        f"stall {totals.stall_ms / 1e3 / max(wall, 1e-9):.0%}"
        f" · plane hits {totals.hit_rate:.0%} ({per})"
    )


def completion_lines(last, totals, budget: int | None) -> list[str]:
    """``run``'s summary after a completion (stderr): speed, timings, memory,
    and the offload line when experts stream under a budget."""
    t = last.timings
    cached = f" ({t.cached_tokens} cached)" if t.cached_tokens else ""
    peak = max(last.memory.peak_rss_bytes, last.memory.rss_bytes)
    lines = [
        stats_line(t),
        f"prompt {t.prompt_tokens} tokens in {t.prompt_s * 1e3:.0f} ms{cached} · "
        f"generated {t.generation_tokens} in {t.generation_s * 1e3:.0f} ms · "
        f"TTFT {t.ttft_s * 1e3:.0f} ms · finish: {last.finish_reason}",
        f"peak memory: {_mib(peak)} RSS",
    ]
    if budget:
        lines.append(offload_line(totals, budget, t))
    return lines


def threads_text(threads: int | None, thread_use: dict[int, float]) -> str:
    """The threads column: a fixed count, or the tuned counts and the share
    of the run each one ran."""
    if threads:
        return str(threads)
    return "auto: " + ", ".join(
        f"{n} ({share:.0%})"
        for n, share in sorted(thread_use.items(), reverse=True)
        if share >= 0.005
    )


def bench_table(name: str, size: int, budget: int | None, threads: str, results):
    """``bench``'s llama-bench-style markdown table, a row per test."""
    budget_col = _mib(budget) if budget else "all"
    rows = [
        "| model | size | budget | threads | test | t/s | stall | MiB read/token "
        "| hits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {name} | {_mib(size)} | {budget_col} | {threads} | {r['test']} | "
        f"{r['tps']:.2f} ± {r['tps_sd']:.2f} | {r['stall_fraction']:.0%} | "
        f"{r['read_per_token'] / 2**20:.1f} | {r['hit_rate']:.0%} |"
        for r in results
    ]
    return "\n".join(rows)


def perplexity_line(res, window: int) -> str:
    return (
        f"perplexity: {res.perplexity:.4f} over {res.tokens} tokens "
        f"({res.windows} windows of {window}, {res.seconds:.1f} s)"
    )
