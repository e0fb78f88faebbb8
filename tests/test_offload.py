"""The offloading runtime: lossless under a budget, memory bounds, HEBF order,
I/O-compute overlap, failures, dual routing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgemoe
from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.quant.types import NestedQuant
from edgemoe.runtime.budget import parse_size
from edgemoe.runtime.dual_routing import LevelPolicy
from edgemoe.runtime.expert_cache import hebf_order
from edgemoe.runtime.offload import min_budget

SMALL = dict(n_ctx=256, n_batch=32)


@pytest.fixture(scope="module")
def converted(converted_fixture):
    return converted_fixture


def quarter_budget(path) -> int:
    """A budget whose expert slots hold about a quarter of the experts, every
    plane of them (all planes are needed at a forced level 8)."""
    with edgemoe.load(path, **SMALL) as m:
        plan = m.memory
    per_expert = plan.experts // (plan.slots[0] + 1)
    fixed = plan.backbone + plan.kv_cache + plan.scratch
    return fixed + per_expert * (plan.slots[0] // 4 + 1) + 1


def test_budget_cache_is_lossless(converted):
    prompt = "def parse_args(argv):\n    parser = "
    # Unrepacked on both sides, as streamed slots are: ggml's repacked
    # kernels round differently (~1e-6), which is no part of the cache.
    with edgemoe.load(converted, force_level=8, repack=False, **SMALL) as m:
        ids = m.tokenize(prompt)
        expected_logits = m.logits(ids)
        expected = [
            r.token
            for r in m.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        ]
        n_total = m.memory.slots[0]
    budget = quarter_budget(converted)
    with edgemoe.load(
        converted, force_level=8, budget=budget, repack=False, **SMALL
    ) as m:
        assert max(m.memory.slots) <= n_total // 4 + 1
        assert np.array_equal(m.logits(ids), expected_logits)
        got = [
            r.token
            for r in m.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        ]
        assert m.routed.cache.counters.evictions > 0  # it really streamed
    assert got == expected


def test_budget_below_minimum_names_it(converted, cli):
    minimum = min_budget(edgemoe.load(converted, **SMALL).checkpoint, 256, 32)
    with pytest.raises(
        ConfigError, match=f"below the minimum .* \\({minimum} bytes\\)"
    ):
        edgemoe.load(converted, budget=minimum - 4096, **SMALL)
    edgemoe.load(converted, budget=minimum, **SMALL).close()
    proc = cli("run", converted, "-p", "x", "--budget", "1MiB", "-c", 256, "-b", 32)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: budget 1.0 MiB") and "minimum" in proc.stderr
    # Every part with its size, and the knobs that lower them.
    for part in ("backbone", "KV cache", "compute scratch", "expert slots"):
        assert re.search(part + r" [\d.]+ [KM]iB", proc.stderr), (part, proc.stderr)
    assert "experts per token," in proc.stderr and "each at level 2" in proc.stderr
    assert "shorter context (-c)" in proc.stderr and "smaller batch (-b)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    rep = json.loads(cli("inspect", converted, "--json").stdout)
    assert rep["min_budget_bytes"] > 0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3GiB", 3 << 30),
        ("1.5 GB", 1_500_000_000),
        ("800M", 800_000_000),
        ("512 MiB", 512 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["3 parsecs", "-1GiB", "", 0, "GiB"])
def test_parse_size_errors(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


RSS_SCRIPT = textwrap.dedent("""
    import json, re, sys, threading, time
    import psutil
    import edgemoe
    from edgemoe.errors import ConfigError
    from edgemoe.env import prepare_environment
    path, tokens, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    opts = dict(n_ctx=1024, n_batch=32)
    # The libraries, not the model: ggml's and llama.cpp's code pages and
    # numpy are no part of a budget. Nothing of the model is loaded yet.
    prepare_environment()
    import llama_cpp, numpy
    from edgemoe.runtime.device import Device
    Device("cpu")
    try:  # the minimum the runtime reports, plus 1 MiB: it must stream hard.
        # Refused before any weight or slot is allocated; it imports the
        # readers and tokenizer libraries, which are no part of a budget.
        edgemoe.load(path, budget=1, **opts)
    except ConfigError as e:
        budget = int(re.search(r"the minimum \\S+ \\S+ \\((\\d+) bytes", str(e))[1])
    if mode == "resident":  # the least that holds every plane balanced runs
        from edgemoe.checkpoint import open_checkpoint
        from edgemoe.runtime.offload import resident_budget
        ckpt = open_checkpoint(path)
        budget = resident_budget(ckpt, **opts)
        ckpt.close()
    budget += 1 << 20
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, samples, stop = [base], [], threading.Event()
    def sample():
        while not stop.is_set():
            peak.append(proc.memory_info().rss)
            time.sleep(0.005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    m = edgemoe.load(path, budget=budget, **opts)
    done, seed = 0, 0
    while done < tokens:  # sequences of up to 1,000 tokens (the context)
        seed += 1
        n = min(1000, tokens - done)
        out = m.generate("def main():", max_tokens=n, temperature=0.8, seed=seed,
                         ignore_eos=True)
        for r in out:
            done += 1
            if done in (tokens // 4, tokens):
                samples.append({"rss": proc.memory_info().rss - base,
                                "threads": proc.num_threads(),
                                "fds": proc.num_fds()})
    stop.set(); t.join()
    print(json.dumps({"peak": max(peak) - base, "samples": samples,
                      "budget": budget, "plan": m.memory.total,
                      "resident": m.memory.resident,
                      "bytes_read": m.counters()["bytes_read"],
                      "computes": m.step.computes,
                      "evictions": m.counters()["evictions"]}))
""")


def run_rss(converted, tmp_path, tokens: int, mode: str = "minimum") -> dict:
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(converted), str(tokens), mode],
        capture_output=True,
        text=True,
        timeout=3600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_rss(rep: dict, min_evictions: int) -> None:
    assert rep["evictions"] >= min_evictions, rep  # it streamed hard
    assert rep["resident"] == (min_evictions == 0), rep
    assert rep["plan"] <= rep["budget"]
    assert rep["peak"] <= 1.1 * rep["budget"], rep
    early, late = rep["samples"]
    assert late["rss"] - early["rss"] <= 2 << 20, rep  # flat: nothing leaks
    assert late["threads"] == early["threads"], rep
    assert late["fds"] == early["fds"], rep


def test_rss_stays_within_budget(converted, tmp_path):
    """From a fresh process, RSS growth over the RSS before the model is
    loaded never exceeds the budget + 10% (sampled every 5 ms) at the
    reported minimum budget, where hundreds of planes are evicted and
    re-read; it stays flat, and threads and open files do not grow."""
    check_rss(run_rss(converted, tmp_path, 1000), min_evictions=300)


def test_budget_that_holds_every_plane_keeps_them_resident(converted, tmp_path):
    """At the least budget that holds every plane the default policy runs
    (planes 1 and 2 for "balanced"), the planes are loaded at start, one
    layer's plane at a time, and never read again: no evictions, RSS within
    the budget + 10% during the load too (sampled every 5 ms), flat after."""
    rep = run_rss(converted, tmp_path, 300, mode="resident")
    check_rss(rep, min_evictions=0)
    assert rep["computes"] <= 300 + 1, rep  # one graph per token, no splits


@pytest.mark.slow
def test_soak_10000_tokens(converted, tmp_path):
    check_rss(run_rss(converted, tmp_path, 10_000), min_evictions=3000)


def test_plan_slots_split():
    from edgemoe.runtime.budget import plan_slots

    planes = (100, 100, 200)  # bytes of one expert's plane 1, 2, 3
    # Dual routing: plane 1 gets half of the room, the others share the rest.
    assert plan_slots(10_400, 0, planes, 64, 2, 1) == (50, 16, 16)
    # A forced level: its planes share the room; above it only the protected.
    assert plan_slots(10_400, 0, planes, 64, 2, 2, forced=True) == (50, 50, 0)
    assert plan_slots(10_400, 0, planes, 64, 2, 2, forced=True, protected=3) == (
        47,
        47,
        3,
    )
    assert plan_slots(10**6, 0, planes, 64, 2, 3) == (64, 64, 64)  # capped
    with pytest.raises(ValueError):
        plan_slots(1_000, 0, planes, 64, 8, 1)
    # A preset's shares (balanced: plane 2 on half the experts, plane 3 on
    # none): plane 2 holds half as many as plane 1, plane 3 only the
    # protected; room plane 1 cannot use (all 64 held) goes to plane 2.
    bal = (1.0, 0.5, 0.0)
    assert plan_slots(6_400, 0, planes, 64, 2, 1, shares=bal) == (40, 20, 0)
    assert plan_slots(6_400, 0, planes, 64, 2, 1, protected=3, shares=bal) == (
        36,
        18,
        3,
    )
    assert plan_slots(10_400, 0, planes, 64, 2, 1, shares=bal) == (64, 36, 0)
    with pytest.raises(ValueError):
        plan_slots(1_000, 0, planes, 64, 8, 1, shares=bal)


def test_hebf_order():
    """D2MoE's example: A's planes carry demand (10, 8, 2), B's (9, 9, 1)."""
    heat = {0: [10.0, 8.0, 2.0], 1: [9.0, 9.0, 1.0], 2: [3.0]}
    assert hebf_order(heat) == [(0, 0), (1, 0), (1, 1), (0, 1), (2, 0), (0, 2), (1, 2)]
    # The rule as written (take the hottest head, ties to the lower expert),
    # on random queues with ties, unordered heats and empty queues.
    rng = np.random.default_rng(4)
    for _ in range(300):
        heat = {
            int(e): rng.choice(
                [0.1, 0.5, 0.9, rng.random()], rng.integers(0, 4)
            ).tolist()
            for e in rng.choice(64, 8, replace=False)
        }
        heads, want = {e: 0 for e, h in heat.items() if h}, []
        while heads:
            e = max(heads, key=lambda x: (heat[x][heads[x]], -x))
            want.append((e, heads[e]))
            heads[e] += 1
            if heads[e] == len(heat[e]):
                del heads[e]
        assert hebf_order(heat) == want, heat


def test_loads_are_queued_in_hebf_order(converted):
    """On a cold cache, the I/O queue receives a layer's missing planes in
    HEBF order: the hottest expert's most significant plane first."""
    with edgemoe.load(
        converted,
        budget=quarter_budget(converted),
        force_level=8,
        prefetch=False,
        **SMALL,
    ) as m:
        cache = m.routed.cache
        submitted = []
        real = cache.io.submit

        def record(req):
            submitted.append((req.key, req.priority))
            return real(req)

        cache.io.submit = record
        # A case where HEBF differs from both expert-major order (all of
        # expert 3 first) and plane-major order (every plane 1 first). The
        # expected order is written out by hand, not taken from hebf_order.
        heat = {3: [0.7, 0.2, 0.1], 5: [0.6, 0.5, 0.4], 1: [0.3, 0.3, 0.3]}
        granted = cache.acquire(0, heat)
        cache.release(0, granted)
        keys = [k for k, _ in sorted(submitted, key=lambda s: s[1])]
        expected = [
            (3, 0),
            (5, 0),
            (5, 1),
            (5, 2),
            (1, 0),
            (1, 1),
            (1, 2),
            (3, 1),
            (3, 2),
        ]
        assert keys == [(0, e, p) for e, p in expected]


def test_heat_sums_the_routing_weight_each_plane_serves():
    """Per expert and plane, the routing weight of the (token, expert) pairs
    that need that plane: what HEBF ranks loads by."""
    from edgemoe.runtime.routed import CachedRouted

    ids = np.array([[0, 1], [1, 2]])
    rw = np.array([[0.6, 0.4], [0.7, 0.3]])
    want = np.array([[3, 1], [2, 1]])  # planes each pair runs with
    heat = CachedRouted._heat([0, 1, 2], ids, rw, want)
    assert heat.keys() == {0, 1, 2}
    np.testing.assert_allclose(heat[0], [0.6, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(heat[1], [1.1, 0.7], atol=1e-6)
    np.testing.assert_allclose(heat[2], [0.3], atol=1e-6)
    only = CachedRouted._heat([1], ids, rw, want)  # experts not asked: left out
    assert list(only) == [1]
    np.testing.assert_allclose(only[1], [1.1, 0.7], atol=1e-6)


@pytest.mark.parametrize("io", ["pread", "direct"])
def test_io_error_mid_generation_is_clean(converted, monkeypatch, io):
    from edgemoe.runtime import io_queue

    queue = {"pread": io_queue.PreadQueue, "direct": io_queue.DirectQueue}[io]
    if io == "direct" and not io_queue.direct_reads_work(
        next(converted.glob("experts-*.gguf"))
    ):
        pytest.skip(f"{converted}'s file system refuses O_DIRECT")
    budget = quarter_budget(converted)
    real = queue.read
    calls = {"n": 0}

    def flaky(self, req):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(5, "Input/output error")
        return real(self, req)

    monkeypatch.setattr(queue, "read", flaky)
    with edgemoe.load(converted, budget=budget, io=io, **SMALL) as m:
        with pytest.raises(ModelFileError, match="read failed .* Input/output error"):
            for _ in m.generate(
                "def main():", max_tokens=64, temperature=0, ignore_eos=True
            ):
                pass
        # The process and the model stay usable.
        out = list(
            m.generate("import os", max_tokens=8, temperature=0, ignore_eos=True)
        )
        assert len(out) == 8


def test_dual_routing_levels():
    plan = NestedQuant((2, 4, 8))
    ids = np.array([[3, 1, 7, 2]])
    w = np.array([[0.3, 0.5, 0.05, 0.15]])  # ranks 1, 0, 3, 2
    # Presets by rank: plane p on the first ceil(share x K) experts.
    balanced = LevelPolicy.make(plan, ((),), "balanced")  # (4, 2, 0) of K=4
    assert balanced.counts(4) == (4, 2, 0)
    assert balanced.planes(0, ids, w).tolist() == [[2, 2, 1, 1]]
    high = LevelPolicy.make(plan, ((),), "high")
    assert high.counts(4) == (4, 4, 2)
    assert high.planes(0, ids, w).tolist() == [[3, 3, 2, 2]]
    assert LevelPolicy.make(plan, ((),), "fast").counts(8) == (8, 2, 0)
    assert LevelPolicy.make(plan, ((),), "max").planes(0, ids, w).tolist() == [[3] * 4]
    assert LevelPolicy.make(plan, ((),), "min").planes(0, ids, w).tolist() == [[1] * 4]
    protected = LevelPolicy.make(plan, ((2,),), "min")
    assert protected.planes(0, ids, w).tolist() == [[1, 1, 1, 3]]
    forced = LevelPolicy.make(plan, ((2,),), force_level=4)
    assert forced.counts(4) == (4, 4, 0)
    assert forced.planes(0, ids, w).tolist() == [[2, 2, 2, 3]]
    # HOBBIT's thresholds: unimportance 0.5, 0, 0.95, 0.8 -> top, top,
    # lowest, middle; decided per token on the host (no fixed counts).
    hobbit = LevelPolicy.make(plan, ((),), (0.6, 0.9))
    assert hobbit.counts(4) is None
    assert hobbit.planes(0, ids, w).tolist() == [[3, 3, 1, 2]]
    with pytest.raises(ConfigError, match="quality must be one of"):
        LevelPolicy.make(plan, (), "best")
    # The batched path (prefill, the cost model) gives the same levels.
    many = np.vstack([ids, ids])
    assert balanced.planes(0, many, np.vstack([w, w])).tolist() == [[2, 2, 1, 1]] * 2
    assert hobbit.planes(0, many, np.vstack([w, w])).tolist() == [[3, 3, 1, 2]] * 2


def test_dual_routing_one_token_matches_batched():
    """Decode's plain-Python path and the numpy path pick the same levels,
    including ties and weights that land exactly on a threshold."""
    plan = NestedQuant((2, 4, 8))
    rng = np.random.default_rng(3)
    w = rng.dirichlet(np.full(8, 0.7), size=400).astype(np.float32)  # [S, 8]
    w[:40] = np.float32(0.125)  # all tied
    w[40:80] = [0.4, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0, 0.0]  # sums hit 0.6 and 0.9
    w[80:90] = 0.0  # no weight at all
    ids = np.tile(np.arange(8), (len(w), 1))  # [S, 8]
    policies = [LevelPolicy.make(plan, ((5,),), force_level=4)] + [
        LevelPolicy.make(plan, ((5,),), q)
        for q in ("balanced", "fast", "high", "min", (0.2, 0.5))
    ]
    for policy in policies:
        quality = policy.thresholds, policy.force_level
        batched = policy.planes(0, ids, w)  # [S, 8]
        one = np.vstack(
            [policy.planes(0, ids[i : i + 1], w[i : i + 1]) for i in range(len(w))]
        )
        assert (batched == one).all(), quality


def test_budget_run_reports_metrics_and_quality(converted, fixture_dir):
    """Dual routing under a budget: per-token metrics, and perplexity within
    3% of level 8 on the fixture."""
    from edgemoe.runtime.perplexity import perplexity

    text = (fixture_dir / "heldout.txt").read_text()[:8000]
    with edgemoe.load(converted, force_level=8, n_ctx=256, n_batch=256) as m:
        ref = perplexity(m, m.tokenize(text, add_special=False), 256).perplexity
    budget = quarter_budget(converted) * 2
    with edgemoe.load(converted, budget=budget, n_ctx=256, n_batch=256) as m:
        got = perplexity(m, m.tokenize(text, add_special=False), 256).perplexity
        read = m.counters()["bytes_read"]
        chunks = list(m.generate("def main():", max_tokens=8, temperature=0))
    assert -0.005 < got / ref - 1 < 0.03  # lower levels cannot beat level 8
    mt = chunks[-1].metrics
    assert set(mt.hits) == {2, 4, 8} and mt.rss_bytes > 0
    assert read > 0 and chunks[0].metrics.compute_ms > 0


def test_direct_io_backend(converted):
    """O_DIRECT reads (page-aligned bounce buffer) give the same model as
    buffered ones."""
    prompt = "import os\nclass A:"
    opts = dict(force_level=8, budget=quarter_budget(converted), **SMALL)
    with edgemoe.load(converted, io="pread", **opts) as m:
        assert m.routed.cache.io.kind == "pread"
        expected = m.logits(m.tokenize(prompt))
    with edgemoe.load(converted, io="direct", **opts) as m:
        assert m.routed.cache.io.kind == "direct"
        assert np.array_equal(m.logits(m.tokenize(prompt)), expected)
        assert m.routed.cache.io.bytes_read > 0


def test_direct_reads_land_in_place_when_aligned(tmp_path):
    """O_DIRECT reads go straight into page-aligned slots (the gaps between
    parts into scratch) and through the bounce buffer otherwise; both give
    the file's bytes, and a short file is a typed error."""
    from edgemoe.checkpoint.base import aligned_empty
    from edgemoe.runtime.io_queue import DirectQueue, ReadRequest, direct_reads_work

    page = 4096
    data = np.random.default_rng(0).integers(0, 256, 12 * page, dtype=np.uint8)
    path = tmp_path / "shard.bin"
    path.write_bytes(data.tobytes())
    if not direct_reads_work(path):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    # Two parts of 2 and 3 pages with a one-page gap, starting at page 2.
    parts = ((0, 2 * page), (3 * page, 3 * page))
    q = DirectQueue(2)
    q.start()
    try:

        def read(dest):
            req = ReadRequest((0,), 0, (0, 0, 0), path, 2 * page, 6 * page, parts, dest)
            q.submit(req).done.wait(10)
            return req

        aligned = [
            aligned_empty((2, page), np.uint8, page),
            aligned_empty((3 * page,), np.uint8, page),
        ]
        assert read(aligned).error is None and q.copied_bytes == 0
        np.testing.assert_array_equal(aligned[0].ravel(), data[2 * page : 4 * page])
        np.testing.assert_array_equal(aligned[1], data[5 * page : 8 * page])
        odd = [
            aligned_empty((2 * page + 64,), np.uint8, page)[64:],
            np.empty(3 * page, np.uint8),
        ]
        assert read(odd).error is None and q.copied_bytes == 6 * page
        np.testing.assert_array_equal(odd[0], data[2 * page : 4 * page])
        np.testing.assert_array_equal(odd[1], data[5 * page : 8 * page])
        short = ReadRequest(
            (0,), 0, (0, 0, 1), path, 8 * page, 6 * page, parts, aligned
        )
        q.submit(short).done.wait(10)
        assert isinstance(short.error, ModelFileError) and "truncated" in str(
            short.error
        )
    finally:
        q.close()


@pytest.mark.parametrize("kind", ["pread", "direct"])
def test_a_read_that_fails_in_any_way_is_an_error_not_a_dead_thread(tmp_path, kind):
    """A destination too small for its part (what a manifest with a wrong
    part size once caused) raises a ValueError inside the I/O thread: it
    becomes the request's typed error, the thread lives on, and the next
    read is served (before, the thread died and the step waited forever)."""
    from edgemoe.checkpoint.base import aligned_empty
    from edgemoe.runtime.io_queue import ReadRequest, direct_reads_work, get_io_backend

    page = 4096
    path = tmp_path / "shard.bin"
    path.write_bytes(bytes(range(256)) * (4 * page // 256))
    if kind == "direct" and not direct_reads_work(path):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    q = get_io_backend(kind, threads=1, probe=path)
    q.start()
    try:
        parts = ((0, 2 * page),)
        bad = ReadRequest(
            (0,), 0, (0, 0, 0), path, 0, 2 * page, parts, [np.empty(1, np.uint8)]
        )
        assert q.submit(bad).done.wait(10)
        assert isinstance(bad.error, ModelFileError) and str(path) in str(bad.error)
        dest = aligned_empty((2 * page,), np.uint8, page)
        good = ReadRequest((0,), 0, (0, 0, 1), path, 0, 2 * page, parts, [dest])
        assert q.submit(good).done.wait(10) and good.error is None
        assert dest[:256].tolist() == list(range(256))
    finally:
        q.close()


def test_auto_io_reads_direct_where_the_file_system_takes_it(converted, monkeypatch):
    """``io="auto"`` probes the first shard: O_DIRECT where a read with it
    works, buffered reads where the file system refuses the flag (as tmpfs
    and some FUSE mounts do), never an error."""
    import os

    from edgemoe.runtime.io_queue import direct_reads_work

    shard = next(converted.glob("experts-*.gguf"))
    budget = quarter_budget(converted)
    works = direct_reads_work(shard)
    with edgemoe.load(converted, force_level=8, budget=budget, io="auto", **SMALL) as m:
        assert m.routed.cache.io.kind == ("direct" if works else "pread")
    real_open = os.open

    def refuse_direct(path, flags, *a, **k):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refuse_direct)
    assert not direct_reads_work(shard)
    with edgemoe.load(converted, force_level=8, budget=budget, io="auto", **SMALL) as m:
        assert m.routed.cache.io.kind == "pread"
        m.logits(m.tokenize("import os"))
        assert m.routed.cache.io.bytes_read > 0
    with pytest.raises(ConfigError, match="io backend must be"):
        edgemoe.load(converted, budget=budget, io="mmap", **SMALL)


def test_baselines_are_lossless_and_validated(converted):
    """The benchmark's baselines (LRU eviction, synchronous loading) compute
    the same model; bad option values are refused by name."""
    prompt = "for i in range(10):"
    with edgemoe.load(converted, force_level=8, repack=False, **SMALL) as m:
        ids = m.tokenize(prompt)
        expected = m.logits(ids)
    with edgemoe.load(
        converted,
        force_level=8,
        budget=quarter_budget(converted),
        eviction="lru",
        prefetch=False,
        repack=False,
        **SMALL,
    ) as m:
        assert np.array_equal(m.logits(ids), expected)
        assert m.routed.cache.counters.evictions > 0
    with pytest.raises(ConfigError, match="eviction must be"):
        edgemoe.load(converted, eviction="fifo", **SMALL)
    with pytest.raises(ConfigError, match="unknown load option"):
        edgemoe.load(converted, pipeline="sync", **SMALL)


def test_bench_counts_tokens_and_expert_bytes(converted, fixture_dir):
    """At a forced level every chosen expert runs all its planes, so the
    expert bytes per token are exactly layers x top-k x one expert's planes."""
    from edgemoe.runtime.bench import bench

    with edgemoe.load(
        converted, force_level=8, budget=quarter_budget(converted), **SMALL
    ) as m:
        pp, tg = bench(m, n_prompt=16, n_gen=6, reps=2)
        cache = m.routed.cache
        per_token = (
            len(cache.moe_layers) * m.spec.n_expert_used * sum(cache.plane_bytes)
        )
        assert (pp.test, tg.test) == ("pp16", "tg6")
        assert len(pp.tps) == len(tg.tps) == 2 and min(pp.tps + tg.tps) > 0
        assert tg.expert_bytes_per_token == [per_token, per_token]
        assert 0 <= min(tg.hit_rate) and max(tg.hit_rate) <= 1
        text = (fixture_dir / "heldout.txt").read_text()[:200]
        ids = m.tokenize(text, add_special=False)
        (tg,) = bench(m, n_prompt=0, n_gen=8, reps=1, tokens=ids)
        assert tg.tps[0] > 0
        with pytest.raises(ConfigError, match="bench text has 3 tokens"):
            bench(m, n_prompt=0, n_gen=8, reps=1, tokens=ids[:3])
        with pytest.raises(ConfigError, match="raise --ctx"):
            bench(m, n_prompt=1000, n_gen=8)


def test_bench_cli(converted, cli):
    args = ("bench", converted, "-p", 16, "-n", 4, "-r", 1, "-c", 64, "-b", 16)
    rep = json.loads(cli(*args, "--json").stdout)
    assert [r["test"] for r in rep["results"]] == ["pp16", "tg4"]
    assert all(r["tps"] > 0 for r in rep["results"]) and rep["budget"] is None
    proc = cli(*args, "--budget", quarter_budget(converted))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "| tg4 |" in line]
    assert len(rows) == 1 and "MiB" in rows[0]
    proc = cli("run", converted, "-p", "def f(x):", "-n", 8, "--temp", 0, "-c", 64)
    assert proc.returncode == 0 and "experts:" not in proc.stderr  # all resident
    proc = cli(
        *("run", converted, "-p", "def f(x):", "-n", 8, "--temp", 0, "-c", 64),
        *("-b", 32, "--budget", quarter_budget(converted)),
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("experts:"))
    assert "MiB/token" in line and "plane hits" in line, line
    # balanced runs planes 1 and 2 only: no "L8 0%" for a plane never run.
    assert "L2" in line and "L4" in line and "L8" not in line, line
    proc = cli(
        *("run", converted, "-p", "def f(x):", "-n", 8, "--temp", 0, "-c", 64),
        *("-b", 32, "--budget", quarter_budget(converted), "--level", 8),
    )
    line = next(x for x in proc.stderr.splitlines() if x.startswith("experts:"))
    assert "L8" in line, line  # a forced level 8 runs the third plane
    proc = cli("bench", converted, "-n", 4, "--text", "/nonexistent.txt")
    assert proc.returncode == 1 and "/nonexistent.txt" in proc.stderr


def test_mixed_levels_match_dequantized_reference(converted):
    """A level per (token, expert), some experts left for a later batch: the
    host-routed expert graph (plane prefixes of different lengths, slabs
    shared by all layers, plane scales as inputs) equals float64 numpy over
    the dequantized planes."""
    from refs import q8

    from edgemoe.format.spec import PROJS
    from edgemoe.quant.nested import dequantize_plane
    from edgemoe.runtime.step import Carry

    with edgemoe.load(converted, **SMALL) as m:
        routed, step, ckpt = m.routed, m.step, m.checkpoint
        layer, t = routed.cache.moe_layers[1], 3
        assert m.spec.n_expert_used == 2 and m.spec.n_expert == 8
        carry = Carry(t, m.spec.n_embd, 2, 3)
        rng = np.random.default_rng(0)
        carry.hn[...] = rng.standard_normal((t, m.spec.n_embd))
        ids = np.array([[0, 3], [5, 1], [2, 7]])
        rw = rng.uniform(0.2, 1.0, (t, 2)).astype(np.float32)
        want = np.array([[3, 1], [2, 3], [1, 2]])
        ready = [0, 1, 2, 3, 5]  # expert 7 in a later batch
        counts = routed._fill(carry, layer, ids, rw, want, ready)
        assert counts == (2, 2, 1)
        step._partial(layer, carry, counts)  # carry.h (zeros) += the experts
        got = carry.h.copy()
        plan, shifts = ckpt.manifest.plan, ckpt.manifest.shifts[layer]

        def level(e: int, n: int) -> list[np.ndarray]:
            mats = []
            for j, proj in enumerate(PROJS):
                w = 0.0
                for p in range(n):
                    raw = ckpt.read_plane(layer, e, p)[j]
                    rows = ckpt.plane_shapes()[proj][0]
                    w = w + dequantize_plane(
                        raw.reshape(rows, -1), plan.planes[p].name, shifts[j][p]
                    ).astype(np.float64)
                mats.append(w)
            return mats

        def reference(levels) -> np.ndarray:
            out = np.zeros((t, m.spec.n_embd))
            xq = q8(carry.hn.copy(), 256).astype(np.float64)
            for i in range(t):
                for e, w, n in zip(ids[i], rw[i], levels[i]):
                    if e not in ready:
                        continue
                    gate, up, down = level(int(e), int(n))
                    g, u = gate @ xq[i], up @ xq[i]
                    act = (g / (1 + np.exp(-g)) * u).astype(np.float32)
                    out[i] += w * (down @ q8(act[None], 256)[0].astype(np.float64))
            return out

        ref = reference(want)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-5, err
        # The levels matter far more than that: all at the top level differs.
        top = reference(np.full_like(want, 3))
        assert np.abs(got - top).max() / np.abs(top).max() > 1e-3


def test_prefetch_predicts_next_layer_and_changes_nothing(converted, fixture_dir):
    """Next-layer prefetch (the next router on this layer's input) loads
    experts that are then used, and never changes what is computed."""
    text = (fixture_dir / "heldout.txt").read_text()[:1500]
    results = {}
    for prefetch in (False, True):
        with edgemoe.load(
            converted,
            force_level=8,
            budget=quarter_budget(converted),
            prefetch=prefetch,
            **SMALL,
        ) as m:
            ids = m.tokenize(text, add_special=False)[:96]
            m.eval(ids[:8])
            logits = [m.eval([t]) for t in ids[8:]]
            c = m.routed.cache.counters
            results[prefetch] = (np.stack(logits), c.prefetches, c.prefetch_hits)
    assert np.array_equal(results[True][0], results[False][0])
    assert results[False][1] == 0
    _, fetched, used = results[True]
    # On this small fixture about half the prefetched planes are used; a
    # predictor no better than chance would hit 2 of 8 experts (25%).
    assert fetched > 0 and used / fetched > 0.35, (fetched, used)


def test_a_layers_own_reads_go_first_and_planes_on_their_way_count(
    converted, fixture_dir
):
    """Under dual routing, a layer queues the reads it waits for before any
    speculative one (the next layer's predicted experts, an upgrade), and an
    expert whose plane 1 is still being read (prefetched) runs at that level:
    it gets no demand read of plane 2 on top (which would double the wait).
    Reads are slowed (an emulated 20 MB/s disk) so prefetches are still in
    flight when their layer comes."""
    from edgemoe.runtime.io_queue import DEMAND

    text = (fixture_dir / "heldout.txt").read_text()[:1500]
    with edgemoe.load(
        converted, budget=quarter_budget(converted), throttle=(20e6, 0.0), **SMALL
    ) as m:
        cache, routed = m.routed.cache, m.routed
        steps = []  # per place(): its layer's planes in flight, its submissions
        submit, place = cache.io.submit, routed.place

        def record_submit(req):
            steps[-1][1].append((req.key, req.priority[0]))
            return submit(req)

        def record_place(layer, carry, run_partial):
            steps.append(({k for k in cache.pending if k[0] == layer}, []))
            return place(layer, carry, run_partial)

        cache.io.submit, routed.place = record_submit, record_place
        ids = m.tokenize(text, add_special=False)[:48]
        m.eval(ids[:8])
        for t in ids[8:]:
            m.eval([t])
    prefetched_in_flight = 0
    for before, subs in steps:
        kinds = [k for _, k in subs]
        assert kinds == sorted(kinds), subs  # every DEMAND before any PREFETCH
        demand = {key for key, k in subs if k == DEMAND}
        for layer, e, p in demand:
            assert p == 0 or (layer, e, p - 1) in demand, (layer, e, p, subs)
        prefetched_in_flight += sum(1 for key in before if key[2] == 0)
    assert prefetched_in_flight > 0  # the case arose


def test_no_guess_for_a_layer_whose_experts_all_have_plane_1(converted, fixture_dir):
    """The next-layer guess costs host time every layer; once a layer holds
    plane 1 of every expert (a budget with a plane-1 slot for each), there is
    nothing to fetch and it is not computed. The per-layer count of plane 1s
    it reads is checked against the slot table."""
    with edgemoe.load(converted, **SMALL) as m:
        plan = m.memory
    half = plan.backbone + plan.kv_cache + plan.scratch + plan.experts // 2
    text = (fixture_dir / "heldout.txt").read_text()[:2000]
    with edgemoe.load(converted, budget=half, **SMALL) as m:
        cache = m.routed.cache
        assert not m.routed.in_memory and cache.slots[0] >= cache.n_expert * len(
            cache.moe_layers
        )
        guesses = []  # (layer, did it hold plane 1 of every expert then)
        prefetch = cache.prefetch

        def record(layer, experts, planes=1):
            if planes == 1:
                guesses.append((layer, cache.first_planes[layer] >= cache.n_expert))
            return prefetch(layer, experts, planes)

        cache.prefetch = record
        ids = m.tokenize(text, add_special=False)[:160]
        m.eval(ids[:8])
        full_layers = set()
        for t in ids[8:]:
            m.eval([t])
            for layer in cache.moe_layers:
                held = sum(1 for (x, _, p) in cache.where if x == layer and p == 0)
                assert cache.first_planes[layer] == held
                if held == cache.n_expert:
                    full_layers.add(layer)
        assert full_layers  # the case arose
        assert guesses and not any(full for _, full in guesses)


def test_host_slots_refuse_a_gpu_device(converted, monkeypatch):
    """Host slabs refilled in place cannot feed a device that computes from its
    own memory: slot_store "host" on a non-host device is refused before
    anything is loaded (no GPU here: a stand-in device says it is not the
    host). "auto" picks device slots there (tests/test_step.py runs them on
    the CPU backend's own buffer)."""
    from edgemoe.runtime import model as model_mod

    class FakeGpu:
        is_host = False
        name = "FakeGPU0"

        def __init__(self, kind, n_threads=None):
            self.kind = kind

    monkeypatch.setattr(model_mod, "Device", FakeGpu)
    with pytest.raises(ConfigError, match="slot_store 'host' needs the CPU"):
        edgemoe.load(converted, device="gpu", slot_store="host", **SMALL)


def test_residency_map_and_quality_switch(converted):
    """The UI's per-layer map: levels match what the cache holds, and a quality
    change takes effect on the next step."""
    with edgemoe.load(converted, budget=quarter_budget(converted), **SMALL) as m:
        assert all((lv == 0).all() for _, lv in m.residency())
        list(m.generate("def f(x):", max_tokens=4, temperature=0, ignore_eos=True))
        res = m.residency()
        assert [layer for layer, _ in res] == list(m.routed.cache.moe_layers)
        cache = m.routed.cache
        for layer, lv in res:
            for e, level in enumerate(lv):
                n = cache.resident_planes(layer, e)
                assert level == (m.levels[n - 1] if n else 0)
        assert any((lv > 0).any() for _, lv in res)
        m.set_quality("min")
        assert m.routed.policy.counts(2) == (2, 0, 0)
        with pytest.raises(ConfigError, match="quality"):
            m.set_quality("best")


def test_shard_changed_under_a_running_model_is_caught(
    converted, fixture_dir, tmp_path
):
    """Every read is CRC-checked, re-reads after eviction too: a shard zeroed
    while a model runs ends generation with a typed error at the next read
    (before, planes were checked on their first read only, and the zeros
    were computed with)."""
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    text = (fixture_dir / "heldout.txt").read_text()
    opts = dict(SMALL, force_level=8, prefetch=False)
    with edgemoe.load(model, budget=quarter_budget(model), **opts) as m:
        cache = m.routed.cache
        read = set()
        submit = cache.io.submit

        def record(req):
            read.add(req.key)
            return submit(req)

        cache.io.submit = record
        tokens = m.tokenize(text)[:200]
        m.eval(tokens)
        assert m.counters()["evictions"] > 0
        # Zero exactly the planes read so far: only a re-read can meet them.
        manifest = m.checkpoint.manifest
        for layer, e, p in read:
            ref = manifest.experts[layer][e][p]
            with open(model / manifest.shards[ref.shard].file, "r+b") as fh:
                fh.seek(ref.offset)
                fh.write(bytes(ref.length))
        m.reset()
        with pytest.raises(ModelFileError, match="checksum mismatch"):
            m.eval(tokens[:64])


def test_bench_reports_progress_between_repetitions(converted):
    """bench calls progress after each repetition with the tokens done so far
    (never inside a timed span), reaching the total."""
    from edgemoe.runtime.bench import bench

    seen = []
    with edgemoe.load(converted, **SMALL) as m:
        bench(m, n_prompt=8, n_gen=4, reps=2, progress=lambda *a: seen.append(a))
    assert seen == [
        ("pp8", 8, 24),
        ("pp8", 16, 24),
        ("tg4", 20, 24),
        ("tg4", 24, 24),
    ]
