"""Device profiles, detection, the cost model, the planner, --profile/--emulate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import edgemoe
from edgemoe.profile import (
    MATMUL_TYPES,
    ProfileError,
    load_profile,
    parse_profile,
    profile_names,
)

DEVICES = [
    "orin-nano-8gb",
    "orin-nx-16gb",
    "agx-orin-32gb",
    "agx-orin-64gb",
    "rpi5-8gb",
    "laptop-rtx4060-8gb",
    "apple-m-16gb",
    "generic-cpu",
]


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch):
    """A user's measured profiles never leak into (or get written by) tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.mark.parametrize("name", DEVICES)
def test_packaged_profiles_load_and_are_consistent(name):
    p = load_profile(name)
    assert p.name == name
    assert 0 < p.memory_usable <= p.memory_total
    assert set(p.matmul) == set(MATMUL_TYPES)
    # Decode matvecs cannot stream weights faster than memory delivers them.
    assert max(p.matmul.values()) <= p.memory_bandwidth
    assert not p.measured and p.sources and p.notes
    fields = {"memory.total", "memory.usable", "memory.bandwidth_gbs"}
    fields |= {f"storage.{k}" for k in ("seq_read_mbs", "rand_read_mbs", "latency_ms")}
    fields |= {f"compute.{k}_overhead_ms" for k in ("token", "layer", "plane")}
    fields |= {"compute.matmul_gbs"}
    assert set(p.datasheet + p.estimated) <= fields
    # Round trip through the writer --measure uses.
    again = parse_profile(p.to_toml(), "again")
    assert again == p


def test_profile_names_list_every_device():
    assert set(DEVICES) <= set(profile_names())


GOOD = load_profile("generic-cpu").to_toml()


def sub(old: str, new: str):
    return lambda text: text.replace(old, new)


@pytest.mark.parametrize(
    "edit, match",
    [
        (sub("bandwidth_gbs = ", "# "), "missing field memory.bandwidth_gbs"),
        (sub("q2_k = ", "# "), "missing field compute.matmul_gbs.q2_k"),
        (sub('backend = "cpu"', 'backend = "tpu"'), "field backend must be"),
        (sub("threads = ", "threads = -"), "field threads must be"),
        (sub("usable = ", 'usable = "lots" # '), "field memory.usable"),
        (sub("[storage]", "[storage]\nspeed = 1"), "unknown field.*storage.speed"),
        (sub("[memory]", "[memory"), "not valid TOML"),
        (sub("usable = ", "usable = 1e15 # "), "more than memory.total"),
        (sub("latency_ms = ", 'latency_ms = "fast" # '), "storage.latency_ms"),
        (sub("token_overhead_ms = ", "# "), "missing field compute.token_overhead_ms"),
    ],
    ids=["missing", "missing-matmul", "backend", "threads", "size", "unknown",
         "toml", "usable>total", "type", "missing-overhead"],
)  # fmt: skip
def test_bad_profiles_name_the_field(tmp_path, edit, match):
    f = tmp_path / "bad.toml"
    f.write_text(edit(GOOD))
    with pytest.raises(ProfileError, match=match) as e:
        load_profile(f)
    assert str(f) in str(e.value)


def test_a_q6_k_rate_is_optional_and_used_for_q6_k_weights(tmp_path):
    """A measured profile states Q6_K's rate (a Q4_K_M backbone's head); the
    cost model uses it for Q6_K tensors and Q4_K's where a profile has none."""
    from edgemoe.runtime.costmodel import _type_rate

    text = GOOD.replace("q2_k = ", "q6_k = 7.5\nq2_k = ")
    p = parse_profile(text, "with-q6")
    assert p.matmul["q6_k"] == 7.5 and parse_profile(p.to_toml(), "again") == p
    assert _type_rate(p, "Q6_K") == 7.5 and _type_rate(p, "Q5_K") == p.matmul["q4_k"]
    plain = load_profile("generic-cpu")
    assert _type_rate(plain, "Q6_K") == plain.matmul["q4_k"]
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace("q2_k = ", "q6_k = -1\nq2_k = "))
    with pytest.raises(ProfileError, match="matmul_gbs.q6_k must be GB/s"):
        load_profile(f)


def test_unknown_profile_lists_known_ones(tmp_path):
    with pytest.raises(ProfileError, match="orin-nano-8gb"):
        load_profile("orin-nano-4gb")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.toml")


def _stage(root, meminfo: str, model: str = "", tegra: str = ""):
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(meminfo)
    if model:
        (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    if tegra:
        (root / "etc").mkdir()
        (root / "etc" / "nv_tegra_release").write_text(tegra)


def test_auto_detects_jetson_and_uses_memavailable(tmp_path):
    from edgemoe.commands.probe import auto_profile

    # Page cache fills RAM: MemFree is tiny, MemAvailable is what can be had.
    _stage(
        tmp_path,
        "MemTotal:  7800000 kB\nMemFree:  300000 kB\nMemAvailable:  4000000 kB\n",
        model="NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
        tegra="# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic",
    )
    prof, found = auto_profile(str(tmp_path))
    assert found.profile == "orin-nano-8gb" and prof.name == "orin-nano-8gb"
    assert dict(found.facts)["l4t"].startswith("# R36")
    assert prof.memory_usable == int(4000000 * 1024 * 0.9)


def test_auto_detects_raspberry_pi_and_generic(tmp_path):
    from edgemoe.commands.probe import auto_profile

    _stage(
        tmp_path / "pi",
        "MemTotal: 8000000 kB\nMemAvailable: 7800000 kB\n",
        model="Raspberry Pi 5 Model B Rev 1.0",
    )
    prof, found = auto_profile(str(tmp_path / "pi"))
    assert prof.name == "rpi5-8gb"
    assert prof.memory_usable == load_profile("rpi5-8gb").memory_usable
    _stage(tmp_path / "pc", "MemTotal: 33554432 kB\nMemAvailable: 20971520 kB\n")
    prof, found = auto_profile(str(tmp_path / "pc"))
    assert found.profile == "generic-cpu"
    assert prof.memory_total == 33554432 * 1024
    assert prof.memory_usable == int(20971520 * 1024 * 0.9)


# -- cost model and planner ------------------------------------------------------------
def test_level_mix_follows_the_policy(converted_fixture):
    from edgemoe.format.reader import EdgeCheckpoint
    from edgemoe.runtime.dual_routing import LevelPolicy
    from edgemoe.runtime.replay import level_mix

    ckpt = EdgeCheckpoint(converted_fixture)
    try:
        m = ckpt.manifest
        trace = m.calibration["routing"][0]  # the converter's recorded routing
        assert len(trace["ids"]) == len(trace["weights"]) == 256
        mix = {
            q: level_mix(ckpt, LevelPolicy.make(m.plan, m.protected, q)).mean(axis=0)
            for q in ("max", "balanced", "min")
        }
        assert mix["max"][3] == pytest.approx(1.0)
        # Lower quality moves experts to fewer planes; shares sum to one.
        planes = {q: float(v @ np.arange(len(v))) for q, v in mix.items()}
        assert planes["min"] < planes["balanced"] < planes["max"]
        for v in mix.values():
            assert v.sum() == pytest.approx(1.0)
        forced = level_mix(ckpt, LevelPolicy.make(m.plan, (), force_level=4))
        assert np.allclose(forced[:, 2], 1.0)
    finally:
        ckpt.close()


def test_prediction_responds_to_budget_and_storage(converted_fixture):
    from edgemoe.format.reader import EdgeCheckpoint
    from edgemoe.runtime.costmodel import predict
    from edgemoe.runtime.dual_routing import LevelPolicy
    from edgemoe.runtime.offload import memory_plan

    prof = load_profile("rpi5-8gb")
    ckpt = EdgeCheckpoint(converted_fixture)
    try:
        m = ckpt.manifest
        policy = LevelPolicy.make(m.plan, m.protected)
        full = memory_plan(ckpt, None, 512, 32, None)
        fixed = full.backbone + full.kv_cache + full.scratch
        preds = []
        plans = [
            memory_plan(ckpt, fixed + frac * full.experts, 512, 32, None)
            for frac in (1.0, 0.5, 0.3)
        ]
        for mp in plans:
            preds.append(predict(ckpt, prof, policy, mp.slots, resident=mp.resident))
        resident = predict(ckpt, prof, policy, None)
        assert resident.read_per_token == 0 and resident.hit_rate == 1.0
        # Resident experts run inside the one step graph; streamed ones end a
        # graph at every MoE layer for the host to place them, plane by plane.
        assert resident.splits == 0
        assert resident.fixed_ms == pytest.approx(prof.token_overhead_ms)
        n_moe, n_layer = len(m.moe_layers), ckpt.spec.n_layer
        assert [mp.resident for mp in plans] == [True, False, False]
        assert [p.splits for p in preds] == [0, n_moe, n_moe]
        assert preds[1].fixed_ms == pytest.approx(
            prof.token_overhead_ms
            + n_moe * prof.layer_overhead_ms
            + preds[1].plane_runs * prof.plane_overhead_ms
        )
        assert n_layer * 2 <= resident.plane_runs <= n_layer * 2 * 3  # top-2, 3 planes
        reads = [p.read_per_token for p in preds]
        hits = [p.hit_rate for p in preds]
        assert reads[0] < reads[1] < reads[2] and hits[0] > hits[1] > hits[2]
        assert hits[0] > 0.99  # all fits: only first uses miss
        assert preds[0].tokens_per_s > preds[2].tokens_per_s
        slots = memory_plan(ckpt, fixed + 0.3 * full.experts, 512, 32, None).slots
        slow = dataclasses_replace(prof, storage_rand_read=prof.storage_rand_read / 10)
        assert predict(ckpt, slow, policy, slots).tokens_per_s < preds[2].tokens_per_s
    finally:
        ckpt.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_replay_matches_the_runtime_cache(converted_fixture, fixture_dir, prefetch):
    """The cost model's replay, fed the routing the runtime saw (and, with
    prefetch, its next-layer guesses), reads what the runtime's cache read:
    same pools, eviction, pinning, upgrades and prefetches."""
    from types import SimpleNamespace

    from edgemoe.runtime import routed
    from edgemoe.runtime.replay import replay

    seen: dict[int, tuple[list, list]] = {}
    guessed: dict[int, list] = {}
    inner, inner_guess = routed.CachedRouted.place, routed.CachedRouted._predict_next

    def run(self, layer, carry, run_partial):
        ids, rw = seen.setdefault(layer, ([], []))
        ids.append(carry.ids[0].astype(int).tolist())
        rw.append(carry.w[0, :, 0].tolist())
        return inner(self, layer, carry, run_partial)

    def predict_next(self, carry, layer):
        real = self.cache.prefetch

        def record(at, experts, planes=1):
            guessed.setdefault(layer, []).append(list(experts))
            return real(at, experts, planes)

        self.cache.prefetch = record
        try:
            inner_guess(self, carry, layer)
        finally:
            del self.cache.prefetch  # the class's method again

    text = (fixture_dir / "heldout.txt").read_text()[:4000]
    with edgemoe.load(converted_fixture, n_ctx=512, n_batch=32) as m:
        mp = m.memory
    fixed = mp.backbone + mp.kv_cache + mp.scratch + mp.runtime
    budget = fixed + int(0.15 * mp.experts) + (1 << 20)
    with edgemoe.load(
        converted_fixture, n_ctx=512, n_batch=32, budget=budget, prefetch=prefetch
    ) as m:
        routed.CachedRouted.place = run
        routed.CachedRouted._predict_next = predict_next
        try:
            tokens = m.tokenize(text, add_special=False)[:160]
            m.reset()
            for i, tok in enumerate(tokens):
                if i == 80:
                    before = m.counters()
                m.eval([tok])
            after = m.counters()
        finally:
            routed.CachedRouted.place = inner
            routed.CachedRouted._predict_next = inner_guess
        misses = np.array(after["misses"]) - np.array(before["misses"])
        read = after["bytes_read"] - before["bytes_read"]
        plane_bytes = np.array(m.routed.cache.plane_bytes)
        man = m.checkpoint.manifest
        routing = [{} for _ in range(m.spec.n_layer)]
        for layer, (ids, rw) in seen.items():
            routing[layer] = {"ids": ids, "weights": rw}
            if prefetch and layer in guessed:
                routing[layer]["next"] = guessed[layer]
        fake = SimpleNamespace(
            manifest=SimpleNamespace(
                plan=man.plan,
                moe_layers=man.moe_layers,
                calibration={"routing": routing},
                hotness=man.hotness,
            ),
            spec=m.spec,
        )
        r = replay(fake, m.routed.policy, m.memory.slots, prefetch=prefetch)
    assert (r.prefetched > 0) == prefetch
    got = r.reads * 80  # per token over the counted half -> total
    assert misses[0] > 20  # the budget makes the cache work
    # Plane-1 misses are demand reads; upgrades and prefetches load in the
    # background, so all reads compare by bytes.
    assert got[0] == pytest.approx(misses[0], rel=0.25)
    total = (got * plane_bytes).sum() + r.prefetched * 80 * plane_bytes[0]
    assert total == pytest.approx(read, rel=0.25)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_profile_plan_cli(converted_fixture, cli):
    r = cli("profile", "--device", "rpi5-8gb", "-m", converted_fixture, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    plan = out["plan"]
    inspect = json.loads(cli("inspect", converted_fixture, "--json").stdout)
    assert plan["min_budget_bytes"] == inspect["min_budget_bytes"]
    assert {row["policy"] for row in plan["rows"]} == {
        "balanced",
        "fast",
        "level-4",
        "level-8",
    }
    assert all(row["tokens_per_s"] > 0 for row in plan["rows"])
    assert plan["recommended"]["policy"] == "balanced"
    text = cli("profile", "--device", "rpi5-8gb", "-m", converted_fixture)
    assert "recommended (*): --budget" in text.stdout
    assert "| budget | policy |" in text.stdout
    bad = cli("profile", "--device", "rpi5-8gb", "-m", converted_fixture.parent)
    assert bad.returncode == 1 and "not a converted model" in bad.stderr
    bad = cli("profile", "--device", "nope")
    assert bad.returncode == 1 and "no device profile 'nope'" in bad.stderr
    bad = cli("profile", "--device", "rpi5-8gb", "-m", converted_fixture, "-c", 99999)
    assert bad.returncode == 1 and "larger than the model's context" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bench_costmodel_rejects_a_bad_pass_count():
    """The benchmark script fails on its arguments before measuring anything."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_costmodel.py"
    for bad in ("0", "two"):
        r = subprocess.run(
            [sys.executable, str(script), "--passes", bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2
        assert f"--passes: must be a whole number >= 1, got '{bad}'" in r.stderr
        assert "Traceback" not in r.stderr


def test_profile_measure_writes_a_loadable_profile(cli, tmp_path):
    out = tmp_path / "me.toml"
    r = cli("profile", "--measure", "-o", out, "--probe-dir", tmp_path, "-t", "1")
    assert r.returncode == 0, r.stderr
    prof = load_profile(out)
    assert prof.measured and prof.threads == 1
    assert prof.memory_bandwidth > 0.5 and prof.storage_rand_read > 1
    assert all(v > 0.05 for v in prof.matmul.values())
    assert 0 < prof.token_overhead_ms < 100 and 0 < prof.layer_overhead_ms < 100
    assert 0 < prof.plane_overhead_ms < prof.layer_overhead_ms
    assert not list(tmp_path.glob(".edgemoe-probe-*"))  # the probe file is gone
    (tmp_path / "a-file").write_text("x")
    bad = cli("profile", "--measure", "-o", out, "--probe-dir", tmp_path / "a-file")
    assert bad.returncode == 1 and "cannot create a storage probe file" in bad.stderr
    assert "Traceback" not in bad.stderr and load_profile(out).measured  # kept


def test_emulated_storage_throttles_reads(converted_fixture):
    """--emulate: expert reads take at least what the emulated device would."""
    from edgemoe.runtime.io_queue import PreadQueue, ReadRequest

    rate = 20e6
    q = PreadQueue(2, throttle=(rate, 0.002))
    q.start()
    try:
        shard = sorted(converted_fixture.glob("experts-*.gguf"))[0]
        n = 1 << 20
        reqs = []
        t = time.perf_counter()
        for i in range(4):
            dest = np.empty(n, dtype=np.uint8)
            req = ReadRequest((0,), 0, (0, 0, i), shard, i * n, n, ((0, n),), [dest])
            reqs.append(q.submit(req))
        for req in reqs:
            req.done.wait(10)
            assert req.error is None
        took = time.perf_counter() - t
    finally:
        q.close()
    # One emulated device: four 1 MiB reads at 20 MB/s plus latency, in series.
    assert took >= 4 * (n / rate + 0.002) * 0.95


def test_run_with_emulate_and_profile(converted_fixture, cli, tmp_path):
    r = cli(
        "run", converted_fixture, "-p", "def f(x):", "-n", "4", "--temp", "0",
        "-c", "256", "--emulate", "rpi5-8gb",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "profile rpi5-8gb: budget 6,656 MiB, expert reads throttled to 350 MB/s" in (
        r.stderr
    )
    assert "experts: budget 6,656 MiB" in r.stderr
    r = cli(
        "run", converted_fixture, "-p", "x", "-n", "2", "--profile", "rpi5-8gb",
        "--budget", "1MiB",
    )  # fmt: skip
    assert r.returncode == 1 and "below the minimum" in r.stderr
    r = cli("run", converted_fixture, "-p", "x", "--profile", "a", "--emulate", "b")
    assert r.returncode == 2  # mutually exclusive


def test_load_rejects_a_bad_throttle(converted_fixture):
    from edgemoe.errors import ConfigError

    with pytest.raises(ConfigError, match="throttle"):
        edgemoe.load(converted_fixture, throttle=(0, 1))


def test_convert_inspect_profile_and_load_agree_on_budgets(
    fixture_dir, converted_fixture, cli, tmp_path, capsys
):
    """One source for the budgets: convert's summary, inspect, profile's plan
    and load all use ``offload.budgets``. The resident budget of a level is
    exactly where load stops streaming, and the recommended flag is the
    starred row's budget as printed (both rounded up)."""
    import re

    import edgemoe
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.format.reader import EdgeCheckpoint
    from edgemoe.report import print_convert_summary
    from edgemoe.runtime.offload import budgets
    from edgemoe.units import mib_up

    ckpt = EdgeCheckpoint(converted_fixture)
    try:
        b = budgets(ckpt)
    finally:
        ckpt.close()
    inspect = json.loads(cli("inspect", converted_fixture, "--json").stdout)
    assert inspect["min_budget_bytes"] == b.minimum
    assert inspect["resident_budget_bytes"] == {
        str(k): v for k, v in b.resident.items()
    }
    plan = json.loads(
        cli("profile", "--device", "rpi5-8gb", "-m", converted_fixture, "--json").stdout
    )["plan"]
    assert (plan["min_budget_bytes"], plan["full_budget_bytes"]) == (
        b.minimum,
        b.resident[8],
    )
    text = cli("profile", "--device", "rpi5-8gb", "-m", converted_fixture).stdout
    starred = re.search(r"\| ([\d,]+) MiB \* \|", text).group(1).replace(",", "")
    assert f"recommended (*): --budget {starred}MiB" in text

    report = convert(fixture_dir, tmp_path / "edge", ConvertOptions(calib_tokens=1024))
    capsys.readouterr()
    print_convert_summary(report)
    summary = capsys.readouterr().out
    for lv in (2, 4, 8):
        assert mib_up(b.resident[lv]) in summary
    assert f"experts stream from {mib_up(b.minimum)}" in summary

    opts = dict(force_level=8, n_ctx=b.n_ctx, n_batch=256)
    with edgemoe.load(converted_fixture, budget=b.resident[8], **opts) as m:
        assert m.memory.resident
    with edgemoe.load(converted_fixture, budget=b.resident[8] - 1, **opts) as m:
        assert not m.memory.resident
