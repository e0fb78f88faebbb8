"""Device profiles: what a device holds and how fast it moves bytes.

A profile is a TOML file: the packaged ones in ``profiles/`` (by file stem), a
measured ``local`` one (``edgemoe profile --measure``), or any path. Every field
is required and checked, so a typo is an error naming the file and the field,
not a silent default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgemoe.errors import ConfigError
from edgemoe.units import parse_size

BACKENDS = ("cpu", "cuda", "metal", "vulkan")
MATMUL_TYPES = ("q8_0", "q4_k", "q2_k")
"""ggml types whose decode matvec rate a profile states: the backbone's Q8_0
and the nested planes' Q4_K and Q2_K."""
MATMUL_OPTIONAL = ("q6_k",)
"""Types a profile may state (a measured one does): Q6_K, the head and
attn_v of a Q4_K_M backbone, runs at its own rate, not Q4_K's (faster per
byte on the AVX-512 machine test_costmodel failed on); without it, Q4_K's
is used."""


class ProfileError(ConfigError):
    """A profile that cannot be read or misses a field."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    backend: str
    """ggml backend for dense weights on this device; streamed experts run on
    the CPU today (see README)."""
    threads: int
    memory_total: int
    """Bytes of RAM (unified memory on Jetson and Apple)."""
    memory_usable: int
    """Bytes a model may use: the OS, CMA or a GPU wired limit take the rest."""
    memory_bandwidth: float
    """GB/s, sustained: decode's ceiling is this over bytes touched per token."""
    storage_seq_read: float
    """MB/s, large sequential reads from a cold cache."""
    storage_rand_read: float
    """MB/s, 2 MiB reads at random offsets, cold, one at a time."""
    storage_latency_ms: float
    """Cost of one cold read beyond its bytes at ``storage_rand_read``: the
    device's latency; in a measured profile, as a streamed decode sees it
    (wake-ups and core sharing included)."""
    matmul: Mapping[str, float]
    """GB/s of weights a decode matvec streams, per ggml type (MATMUL_TYPES);
    measured: the fastest thread count's."""
    token_overhead_ms: float
    """Per decode step: the host's work around the step graph and its first
    graph."""
    layer_overhead_ms: float
    """Per host-routed MoE layer and token (a split): the graph ends after the
    router, the host places the experts, the next graph starts; none where
    every plane is resident with fixed counts."""
    plane_overhead_ms: float
    """Per expert plane the host places at a split (levels, cache lookups,
    slot ids)."""
    measured: bool = False
    """True for ``edgemoe profile --measure`` output."""
    datasheet: tuple[str, ...] = ()
    """Fields taken from vendor datasheets, not re-checked."""
    estimated: tuple[str, ...] = ()
    """Fields estimated (no measurement of this device here)."""
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    path: str = field(default="", compare=False)

    def to_toml(self) -> str:
        """The profile as TOML that ``load_profile`` reads back."""

        def s(v: str) -> str:
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

        def lst(vs) -> str:
            return "[" + ", ".join(s(v) for v in vs) + "]"

        matmul = "\n".join(f"{k} = {v:.3f}" for k, v in self.matmul.items())
        return (
            f"name = {s(self.name)}\n"
            f"description = {s(self.description)}\n"
            f"backend = {s(self.backend)}\n"
            f"threads = {self.threads}\n\n"
            "[memory]\n"
            f"total = {self.memory_total}\n"
            f"usable = {self.memory_usable}\n"
            f"bandwidth_gbs = {self.memory_bandwidth:.3f}\n\n"
            "[storage]\n"
            f"seq_read_mbs = {self.storage_seq_read:.1f}\n"
            f"rand_read_mbs = {self.storage_rand_read:.1f}\n"
            f"latency_ms = {self.storage_latency_ms:.3f}\n\n"
            "[compute]\n"
            f"token_overhead_ms = {self.token_overhead_ms:.4f}\n"
            f"layer_overhead_ms = {self.layer_overhead_ms:.4f}\n"
            f"plane_overhead_ms = {self.plane_overhead_ms:.4f}\n\n"
            "[compute.matmul_gbs]\n"
            f"{matmul}\n\n"
            "[meta]\n"
            f"measured = {'true' if self.measured else 'false'}\n"
            f"datasheet = {lst(self.datasheet)}\n"
            f"estimated = {lst(self.estimated)}\n"
            f"notes = {lst(self.notes)}\n"
            f"sources = {lst(self.sources)}\n"
        )


# (section, key) -> (kind, what is expected), for the checks and their errors.
_FIELDS: dict[tuple[str, str], tuple[str, str]] = {
    ("", "name"): ("str", "a name"),
    ("", "description"): ("str", "a one-line description"),
    ("", "backend"): ("backend", "one of " + ", ".join(BACKENDS)),
    ("", "threads"): ("int", "a positive thread count"),
    ("memory", "total"): ("size", "bytes or a size like '8GiB'"),
    ("memory", "usable"): ("size", "bytes or a size like '5.2GiB'"),
    ("memory", "bandwidth_gbs"): ("num", "GB/s, a positive number"),
    ("storage", "seq_read_mbs"): ("num", "MB/s, a positive number"),
    ("storage", "rand_read_mbs"): ("num", "MB/s, a positive number"),
    ("storage", "latency_ms"): ("num", "milliseconds, a positive number"),
    ("compute", "token_overhead_ms"): ("num", "milliseconds, a positive number"),
    ("compute", "layer_overhead_ms"): ("num", "milliseconds, a positive number"),
    ("compute", "plane_overhead_ms"): ("num", "milliseconds, a positive number"),
    ("compute", "matmul_gbs"): (
        "matmul",
        "a table of GB/s for " + ", ".join(MATMUL_TYPES),
    ),
    ("meta", "measured"): ("bool", "true or false"),
    ("meta", "datasheet"): ("strs", "a list of field names"),
    ("meta", "estimated"): ("strs", "a list of field names"),
    ("meta", "notes"): ("strs", "a list of strings"),
    ("meta", "sources"): ("strs", "a list of strings"),
}
_SECTIONS = {"memory", "storage", "compute", "meta"}


def _check(path: str, data: dict[str, Any]) -> dict[str, Any]:
    """Every field present, of its kind; nothing unknown. Returns flat values."""
    unknown = [k for k in data if k not in _SECTIONS and ("", k) not in _FIELDS]
    for sec in _SECTIONS & set(data):
        if not isinstance(data[sec], dict):
            raise ProfileError(f"{path}: [{sec}] must be a table")
        unknown += [f"{sec}.{k}" for k in data[sec] if (sec, k) not in _FIELDS]
    if unknown:
        raise ProfileError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for (sec, key), (kind, what) in _FIELDS.items():
        name = f"{sec}.{key}" if sec else key
        table = data.get(sec, {}) if sec else data
        if key not in table:
            raise ProfileError(f"{path}: missing field {name} ({what})")
        v = table[key]
        bad = ProfileError(f"{path}: field {name} must be {what}, got {v!r}")
        if kind == "str":
            if not isinstance(v, str) or not v.strip():
                raise bad
        elif kind == "backend":
            if v not in BACKENDS:
                raise bad
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad
        elif kind == "num":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise bad
            v = float(v)
        elif kind == "size":
            try:
                v = parse_size(v)
            except ConfigError:
                raise bad from None
        elif kind == "bool":
            if not isinstance(v, bool):
                raise bad
        elif kind == "strs":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise bad
            v = tuple(v)
        elif kind == "matmul":
            if not isinstance(v, dict):
                raise bad
            extra = sorted(set(v) - set(MATMUL_TYPES) - set(MATMUL_OPTIONAL))
            if extra:
                raise ProfileError(
                    f"{path}: unknown field(s) {name}.{', '.join(extra)}"
                )
            for t in MATMUL_TYPES + MATMUL_OPTIONAL:
                x = v.get(t)
                if x is None and t in MATMUL_OPTIONAL:
                    continue
                if x is None:
                    raise ProfileError(f"{path}: missing field {name}.{t} (GB/s)")
                if isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0:
                    raise ProfileError(
                        f"{path}: field {name}.{t} must be GB/s, a positive number, "
                        f"got {x!r}"
                    )
            v = {t: float(x) for t, x in v.items()}
        out[name] = v
    if out["memory.usable"] > out["memory.total"]:
        raise ProfileError(
            f"{path}: memory.usable ({out['memory.usable']} bytes) is more than "
            f"memory.total ({out['memory.total']} bytes)"
        )
    return out


def parse_profile(text: str, path: str = "<profile>") -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    v = _check(path, data)
    return DeviceProfile(
        name=v["name"],
        description=v["description"],
        backend=v["backend"],
        threads=v["threads"],
        memory_total=v["memory.total"],
        memory_usable=v["memory.usable"],
        memory_bandwidth=v["memory.bandwidth_gbs"],
        storage_seq_read=v["storage.seq_read_mbs"],
        storage_rand_read=v["storage.rand_read_mbs"],
        storage_latency_ms=v["storage.latency_ms"],
        matmul=v["compute.matmul_gbs"],
        token_overhead_ms=v["compute.token_overhead_ms"],
        layer_overhead_ms=v["compute.layer_overhead_ms"],
        plane_overhead_ms=v["compute.plane_overhead_ms"],
        measured=v["meta.measured"],
        datasheet=v["meta.datasheet"],
        estimated=v["meta.estimated"],
        notes=v["meta.notes"],
        sources=v["meta.sources"],
        path=path,
    )


def user_dir() -> Path:
    """Where ``--measure`` writes ``local.toml`` (XDG config home)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "edgemoe" / "profiles"


def profile_names(user: bool = True) -> list[str]:
    """Packaged profile stems, then (``user``) the user's measured ones."""
    from importlib.resources import files

    names = sorted(
        p.name[:-5]
        for p in files("edgemoe.profiles").iterdir()
        if p.name.endswith(".toml")
    )
    d = user_dir()
    if user and d.is_dir():
        names += sorted(p.stem for p in d.glob("*.toml") if p.stem not in names)
    return names


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A profile by stem (``orin-nano-8gb``, ``local``) or by TOML path."""
    from importlib.resources import files

    text_path = str(name_or_path)
    p = Path(text_path)
    if text_path.endswith(".toml") or os.sep in text_path:
        source = p
    else:
        user = user_dir() / f"{text_path}.toml"
        packaged = files("edgemoe.profiles") / f"{text_path}.toml"
        if user.is_file():
            source = user
        elif packaged.is_file():
            return parse_profile(packaged.read_text(encoding="utf-8"), text_path)
        else:
            raise ProfileError(
                f"no device profile {text_path!r}; known: {', '.join(profile_names())}"
                " (or pass a path to a .toml file)"
            )
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(f"{source}: cannot read profile: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{source}: profile is not UTF-8 text") from None
    return parse_profile(text, str(source))
