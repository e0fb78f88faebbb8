"""This device, for ``edgemoe profile``: detect it (memory, cores, board) and
measure it (memory bandwidth, storage reads, matmul rates, and the engine's
costs fitted on small models: probe_costs.py) into a ``DeviceProfile``.

An app-level probe: it drives the runtime and the converters, so it lives with
the commands, not in the foundation; it imports them inside the functions that
need them.
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
from edgemoe.profile import (
    MATMUL_OPTIONAL,
    MATMUL_TYPES,
    DeviceProfile,
    ProfileError,
    load_profile,
)

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
            from edgemoe.runtime.device import default_threads

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
    from edgemoe.runtime.io_queue import drop_cached
    from edgemoe.runtime.measure import BusyCompute, queue_reads

    try:

        def read(offset: int, n: int) -> None:
            try:
                os.preadv(fd, [memoryview(buf)[:n]], offset)
            except OSError as e:
                raise ConfigError(f"{path}: read failed: {e.strerror}") from None

        drop_cached(path)
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
        drop_cached(path)
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
    from edgemoe.runtime.device import default_threads

    tuned = threads is None
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
    for name in MATMUL_TYPES + MATMUL_OPTIONAL:
        progress(f"ggml {name.upper()} matvec")
        rates[name] = matmul_rate(name.upper(), threads)
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
        token_overhead_ms=1.0,
        layer_overhead_ms=1.0,
        plane_overhead_ms=0.05,
        measured=True,
        notes=(
            f"measured {time.strftime('%Y-%m-%d %H:%M')} by edgemoe profile --measure",
            "storage: "
            + ("O_DIRECT" if st["direct"] else "buffered reads (no O_DIRECT here)")
            + f", {where}",
            "matmul: one-row mul_mat_id over 64 experts, the fastest of 1 to "
            f"{threads} threads",
        ),
    )
    from edgemoe.commands.probe_costs import runtime_costs

    progress("the engine's costs (four small converted models, ~2 minutes)")
    with tempfile.TemporaryDirectory(prefix="edgemoe-measure-") as tmp:
        costs = runtime_costs(prof, None if tuned else threads, Path(tmp))
    return replace(
        costs.apply(prof),
        notes=(
            *prof.notes,
            f"storage latency: per plane read during a streamed decode "
            f"(a {st['latency_ms']:.3f} ms probe read alone)",
            f"runtime costs fitted on decodes within {costs.fit_error:.0%}",
        ),
    )


def write_profile(prof: DeviceProfile, path: Path) -> None:
    """Write atomically: a failed run never leaves half a profile behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(prof.to_toml(), encoding="utf-8")
    os.replace(tmp, path)
