"""``edgemoe profile``: detect the device, measure it, and plan a model on it.

App shell, like cli.py: it imports the runtime and converters lazily, inside
the functions that need them.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgemoe.errors import ConfigError
from edgemoe.profile import DeviceProfile, ProfileError, load_profile

MiB = 1 << 20


# -- detection ------------------------------------------------------------------
def meminfo(root: str = "/") -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out = {}
    try:
        with open(os.path.join(root, "proc/meminfo")) as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().replace(b"\0", b"").decode("utf-8", "replace").strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Detected:
    profile: str
    """The packaged profile this device matches."""
    model: str
    """What the board or OS says it is."""
    facts: tuple[tuple[str, str], ...]


def detect(root: str = "/") -> Detected:
    """Which device this is: Jetson (L4T release file, device-tree model,
    nvpmodel mode), Raspberry Pi 5, an Apple Silicon Mac, or a generic CPU.
    ``root`` lets tests stage the files."""
    model = _read(os.path.join(root, "proc/device-tree/model"))
    facts = []
    tegra = os.path.join(root, "etc/nv_tegra_release")
    if os.path.exists(tegra):
        facts.append(("l4t", (_read(tegra).splitlines() or [""])[0][:80]))
        mode = _nvpmodel()
        if mode:
            facts.append(("nvpmodel", mode))
        total = meminfo(root).get("MemTotal", 0)
        m = model.lower()
        if "nano" in m:
            name = "orin-nano-8gb"
        elif " nx" in m or "orin nx" in m:
            name = "orin-nx-16gb"
        else:
            name = "agx-orin-64gb" if total > 40 * 2**30 else "agx-orin-32gb"
        return Detected(name, model or "NVIDIA Jetson", tuple(facts))
    if "raspberry pi 5" in model.lower():
        return Detected("rpi5-8gb", model, ())
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return Detected("apple-m-16gb", "Apple Silicon Mac", ())
    return Detected("generic-cpu", platform.processor() or platform.machine(), ())


def _nvpmodel() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["nvpmodel", "-q"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return " ".join(out.split())[:80]


def auto_profile(root: str = "/") -> tuple[DeviceProfile, Detected]:
    """The profile for this machine: its measured ``local`` profile when there
    is one, else the matching packaged one. Usable memory is capped by
    MemAvailable (page cache counts as available; MemFree would refuse loads
    on a machine whose RAM is full of cache), less 10% for the OS."""
    found = detect(root)
    try:
        prof = load_profile("local")
    except ProfileError:
        prof = load_profile(found.profile)
    info = meminfo(root)
    if "MemAvailable" in info:
        avail = int(info["MemAvailable"] * 0.9)
        if not prof.measured and found.profile == "generic-cpu":
            total = info.get("MemTotal", prof.memory_total)
            from edgemoe.runtime.graph import default_threads

            prof = replace(
                prof, memory_total=total, memory_usable=total, threads=default_threads()
            )
        prof = replace(prof, memory_usable=min(prof.memory_usable, avail))
    return prof, found


# -- measuring ------------------------------------------------------------------
def memory_bandwidth(size: int = 256 * MiB, reps: int = 4) -> float:
    """GB/s of a large copy (bytes read + written), median of ``reps``."""
    a = np.ones(size // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / float(np.median(times)) / 1e9


def storage(
    directory: Path, size: int = 256 * MiB, threads: int | None = None
) -> dict[str, float]:
    """Cold reads of a scratch file written in ``directory`` (see
    ``storage_file``). A virtual machine's host may still cache what was just
    written: probing a model's existing shards (``-m``) is more honest."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd_w, name = tempfile.mkstemp(prefix=".edgemoe-probe-", dir=directory)
    except OSError as e:
        raise ConfigError(
            f"{directory}: cannot create a storage probe file there: {e.strerror or e}"
        ) from None
    path = Path(name)
    try:
        chunk = np.random.default_rng(0).integers(0, 255, 8 * MiB, dtype=np.uint8)
        try:
            for _ in range(size // chunk.size):
                os.write(fd_w, chunk.tobytes())
            os.fsync(fd_w)
        except OSError as e:
            raise ConfigError(
                f"{directory}: cannot write a {size // MiB} MiB probe file: "
                f"{e.strerror}"
            ) from None
        finally:
            os.close(fd_w)
        return storage_file(path, threads)
    finally:
        path.unlink(missing_ok=True)


def storage_file(path: Path, threads: int | None = None) -> dict[str, float]:
    """Cold reads of an existing file (read only): sequential MB/s (O_DIRECT
    where the file system allows it), and the random-read MB/s and per-read
    latency (ms) of the runtime's own I/O queue."""
    from edgemoe.checkpoint.base import aligned_empty

    size = min(path.stat().st_size, 512 * MiB) // (8 * MiB) * (8 * MiB)
    if size < 16 * MiB:
        raise ConfigError(f"{path}: too small to measure reads (needs 16 MiB)")
    direct = True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        direct = False
        fd = os.open(path, os.O_RDONLY)
    buf = aligned_empty((8 * MiB,), np.uint8, 4096)
    try:

        def cold() -> None:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        def read(offset: int, n: int) -> None:
            try:
                os.preadv(fd, [memoryview(buf)[:n]], offset)
            except OSError as e:
                raise ConfigError(f"{path}: read failed: {e.strerror}") from None

        from edgemoe.runtime.measure import BusyCompute, queue_reads

        cold()
        # Random reads through the runtime's own I/O queue (buffered pread,
        # pages dropped after): a small and a plane-sized read give the
        # per-read cost and the rate, timed while ggml computes on every
        # thread, as during a decode (the I/O thread then waits for a core).
        small, big = 64 << 10, 2 * MiB
        with BusyCompute(threads):
            t_small = queue_reads(path, small, 48, seed=1)
            t_big = queue_reads(path, big, 32, seed=2)
        rand = (big - small) / max(t_big - t_small, 1e-9) / 1e6
        lat = max(t_small - small / (rand * 1e6), 1e-6)
        cold()
        t = time.perf_counter()
        for off in range(0, size, 8 * MiB):
            read(off, 8 * MiB)
        seq = size / (time.perf_counter() - t) / 1e6
    finally:
        os.close(fd)
    return {
        "seq_read_mbs": seq,
        "rand_read_mbs": rand,
        "latency_ms": lat * 1e3,
        "direct": float(direct),
    }


def overheads(
    profile: DeviceProfile, threads: int, workdir: Path
) -> tuple[float, float]:
    """(ms per layer, per expert plane run) that the runtime spends beyond
    moving bytes. Three small converted models with random
    weights (top-2 of 8, top-4 of 32 and top-8 of 64 experts) decode text
    under two budgets each, one holding every plane and one half of them, as
    streamed models run (dual routing, waves, background reads, prefetch).
    What the cost model charges for their weights and reads at the measured
    rates is taken away; a least-squares fit splits the rest."""
    from edgemoe.converters.calibration import default_text
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.converters.synth import preset_config, write_hf
    from edgemoe.runtime.bench import bench
    from edgemoe.runtime.costmodel import predict
    from edgemoe.runtime.model import load

    zero = replace(profile, layer_overhead_ms=1e-9, plane_overhead_ms=1e-9)
    text = default_text()[:40000]
    models = []
    try:
        for name, experts, used in (("small", 8, 2), ("mid", 32, 4), ("wide", 64, 8)):
            cfg = preset_config(
                "demo", num_local_experts=experts, num_experts_per_tok=used
            )
            hf = write_hf(cfg, workdir / f"{name}-hf", force=True)
            edge = workdir / f"{name}-edge"
            convert(hf, edge, ConvertOptions(calib_tokens=512, calib_window=256))
            with load(edge, n_threads=threads, n_ctx=512) as model:
                mp = model.memory
            fixed = mp.backbone + mp.kv_cache + mp.scratch + (16 << 20)
            for share in (1.0, 0.5):
                budget = fixed + int(share * mp.experts)
                models.append(load(edge, n_threads=threads, n_ctx=512, budget=budget))
        # Round robin, so that the machine's drift hits every model alike;
        # each round decodes a fresh stretch of text on a warm cache.
        samples: list[list[float]] = [[] for _ in models]
        streams = [m.tokenize(text, add_special=False) for m in models]
        for r in range(3):
            for model, tokens, out in zip(models, streams, samples):
                part = tokens[r * 128 : (r + 1) * 128]
                (tg,) = bench(model, n_prompt=0, n_gen=64, reps=2, tokens=part)
                out.append(tg.tps[-1])
        rows, rest = [], []
        for model, out in zip(models, samples):
            ms = 1e3 / float(np.median(out))
            slots = model.memory.slots
            pred = predict(model.checkpoint, zero, model.routed.policy, slots)
            rows.append((model.spec.n_layer, pred.plane_runs))
            rest.append(max(ms - pred.ms_per_token, 0.0))
    finally:
        for model in models:
            model.close()
    # Least squares: overhead = per_layer * layers + per_plane * plane runs.
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(rest), rcond=None)
    per_layer, per_plane = (float(c) for c in coef)
    return max(per_layer, 0.001), max(per_plane, 0.0001)


def measure(
    directory: Path,
    threads: int | None = None,
    progress=lambda msg: None,
    probe_file: Path | None = None,
) -> DeviceProfile:
    """A measured profile of this machine: storage read from ``probe_file``
    (read only) or from a scratch file written in ``directory``."""
    from edgemoe.runtime.measure import matmul_rate

    base, found = auto_profile()
    from edgemoe.runtime.graph import default_threads

    threads = threads or default_threads()
    progress("memory bandwidth")
    bw = memory_bandwidth()
    if probe_file is not None:
        progress(f"storage: reading {probe_file}")
        st = storage_file(probe_file, threads)
        where = f"reading {probe_file}"
    else:
        progress(f"storage: a scratch file in {directory}")
        st = storage(directory, threads=threads)
        where = f"a scratch file in {directory}"
    rates = {}
    for name, t in (("q8_0", "Q8_0"), ("q4_k", "Q4_K"), ("q2_k", "Q2_K")):
        progress(f"ggml {t} matvec")
        rates[name] = matmul_rate(t, threads)
    info = meminfo()
    total = info.get("MemTotal", base.memory_total)
    prof = DeviceProfile(
        name="local",
        description=f"this machine, measured ({found.model or platform.node()})",
        backend="cpu",
        threads=threads,
        memory_total=total,
        memory_usable=min(info.get("MemAvailable", base.memory_usable), total),
        memory_bandwidth=bw,
        storage_seq_read=st["seq_read_mbs"],
        storage_rand_read=st["rand_read_mbs"],
        storage_latency_ms=st["latency_ms"],
        matmul=rates,
        layer_overhead_ms=1.0,
        plane_overhead_ms=0.05,
        measured=True,
        notes=(
            f"measured {time.strftime('%Y-%m-%d %H:%M')} by edgemoe profile --measure",
            "storage: "
            + ("O_DIRECT" if st["direct"] else "buffered reads (no O_DIRECT here)")
            + f", {where}",
            f"matmul: one-row mul_mat_id over 64 experts, {threads} threads",
        ),
    )
    progress("runtime overheads (two small converted models, streamed)")
    with tempfile.TemporaryDirectory(prefix="edgemoe-measure-") as tmp:
        per_layer, per_plane = overheads(prof, threads, Path(tmp))
    return replace(prof, layer_overhead_ms=per_layer, plane_overhead_ms=per_plane)


def write_profile(prof: DeviceProfile, path: Path) -> None:
    """Write atomically: a failed run never leaves half a profile behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(prof.to_toml(), encoding="utf-8")
    os.replace(tmp, path)
