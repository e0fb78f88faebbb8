"""The converted-model directory: constants and the manifest's strict schema.

    OUT/
      manifest.json          this schema
      backbone.gguf          everything but the routed experts (llama.cpp names)
      experts-00001.gguf ... expert planes, 4096-aligned, one tensor per
                             (layer, expert, plane, projection)
      tokenizer.json ...     the source's tokenizer files (HF sources)

An expert's plane p is three tensors (gate, up, down) stored back to back, so
loading it is one contiguous read; ``PlaneRef`` says where, and its CRC-32.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from edgemoe.arch.base import ModelSpec
from edgemoe.checkpoint.files import plain_name
from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.quant.types import BLOCK_TYPES, NestedQuant

FORMAT = "edgemoe"
VERSION = 1
ALIGNMENT = 4096
"""Expert tensors start on page boundaries: a plane is one aligned pread and
can go straight into O_DIRECT buffers."""
MANIFEST = "manifest.json"
BACKBONE = "backbone.gguf"
SHARD = "experts-{:05d}.gguf"
PROJS = ("gate", "up", "down")


def expert_tensor_name(layer: int, expert: int, plane: int, proj: str) -> str:
    return f"blk.{layer}.exp.{expert}.p{plane}.{proj}"


@dataclass(frozen=True)
class FileRef:
    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class PlaneRef:
    """Where one expert's plane lives: ``length`` bytes from ``offset`` in
    shard ``shard``; ``parts`` are (offset within that span, bytes) for gate,
    up and down; ``crc32`` covers the three parts' bytes, in that order."""

    shard: int
    offset: int
    length: int
    crc32: int
    parts: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Hotness:
    """How often calibration routed tokens to an expert, and how strongly."""

    freq: float
    """Fraction of calibration tokens that picked this expert."""
    weight: float
    """Mean routing weight when picked."""


@dataclass(frozen=True)
class Manifest:
    architecture: str
    """The source's own identifier (HF architectures[0] or GGUF arch)."""
    spec: ModelSpec
    levels: tuple[int, ...]
    expert_ffn: int
    """Stored FFN width: the model's, padded with zero rows to the plane block."""
    shifts: tuple[tuple[tuple[int, ...], ...], ...]
    """[layer][projection][plane] power-of-two prescale (see quant/nested.py)."""
    backbone: FileRef
    backbone_type: str
    shards: tuple[FileRef, ...]
    experts: tuple[tuple[tuple[PlaneRef, ...], ...], ...]
    """[layer][expert][plane]; layers without experts have no entries."""
    hotness: tuple[tuple[Hotness, ...], ...]
    protected: tuple[tuple[int, ...], ...]
    """[layer] experts always run at the top level (super experts)."""
    calibration: dict[str, Any]
    tokenizer: str
    """"hf" (tokenizer.json in the directory) or "gguf" (in backbone.gguf)."""
    chat_template: str | None = None
    expert_dim: int = 0
    """Stored hidden width of the expert matrices: the model's, padded with
    zero columns (gate, up) and rows (down) to the plane block; 0: the
    model's (manifests before gpt-oss's 2,880)."""
    version: int = VERSION
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def stored_dim(self) -> int:
        """The expert matrices' hidden width as stored (padded or not)."""
        return self.expert_dim or self.spec.n_embd

    @property
    def plan(self) -> NestedQuant:
        return NestedQuant(self.levels)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, moe in enumerate(self.spec.moe_layers) if moe]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d = {"format": FORMAT, **d}
        d["plane_types"] = [p.name for p in self.plan.planes]
        return d

    @classmethod
    def from_json(cls, d: Any, path: str) -> Manifest:
        """Parse and check a manifest; every inconsistency names itself."""
        return _parse(d, path)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _uint(x: Any, limit: int = 1 << 50) -> int:
    """A plain int in 0..limit-1 (int() would take 1.5, True, "3" or inf)."""
    if type(x) is not int or not 0 <= x < limit:
        raise ValueError(x)
    return x


def _count(x: Any) -> str:
    return str(len(x)) if isinstance(x, list) else f"a {type(x).__name__}, not"


def _fail(path: str, problem: str) -> ModelFileError:
    return ModelFileError(path, f"invalid manifest: {problem}")


def _get(d: dict, key: str, kind: type | tuple, path: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _fail(path, f"missing key {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise _fail(path, f"{key!r} has type {type(v).__name__}")
    return v


def _file_ref(d: Any, path: str, what: str) -> FileRef:
    if not isinstance(d, dict) or not {"file", "bytes", "sha256"} <= d.keys():
        raise _fail(path, f"{what} needs file, bytes and sha256")
    name, size, digest = d["file"], d["bytes"], d["sha256"]
    # Opened as root / name: an absolute name or "../" would leave the model.
    plain_name(name, f"{what}'s file", path)
    if type(size) is not int or not 0 <= size < 1 << 50:
        raise _fail(path, f"{what}'s bytes must be an integer >= 0, got {size!r}")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise _fail(path, f"{what}'s sha256 must be 64 hex digits, got {digest!r}")
    return FileRef(name, size, digest)


def _parse(d: Any, path: str) -> Manifest:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _fail(path, f"not an EdgeMoE manifest (format must be {FORMAT!r})")
    version = _get(d, "version", int, path)
    if version > VERSION:
        raise ModelFileError(
            path,
            f"written by a newer EdgeMoE (format version {version}; this one "
            f"reads up to {VERSION}): upgrade EdgeMoE or convert again",
        )
    if version < 1:
        raise _fail(path, f"version {version}")
    spec_d = _get(d, "spec", dict, path)
    try:
        spec_d = dict(spec_d)
        for key in ("moe_layers", "swa_layers", "eos_token_ids"):
            if isinstance(spec_d.get(key), list):  # JSON has no tuples
                spec_d[key] = tuple(spec_d[key])
        spec = ModelSpec(**spec_d)
    except (TypeError, KeyError) as e:
        raise _fail(path, f"spec: {e}") from None
    except ConfigError as e:  # a value ModelSpec's checks refuse, by field name
        raise ConfigError(f"{path}: spec: {e}") from None
    try:
        plan = NestedQuant(tuple(_get(d, "levels", list, path)))
    except Exception as e:  # ConfigError with the reason
        raise _fail(path, f"levels: {e}") from None
    types = _get(d, "plane_types", list, path)
    if types != [p.name for p in plan.planes]:
        raise _fail(
            path, f"plane_types {types} do not match levels {list(plan.levels)}"
        )
    backbone_type = _get(d, "backbone_type", str, path)
    shards = tuple(
        _file_ref(s, path, f"shard {i}")
        for i, s in enumerate(_get(d, "shards", list, path))
    )
    expert_ffn = _get(d, "expert_ffn", int, path)
    # The stored FFN is the spec's padded up to whole quant blocks.
    if not spec.expert_ffn <= expert_ffn <= 1 << 20:
        raise _fail(path, f"expert_ffn {expert_ffn} for a model of {spec.expert_ffn}")
    expert_dim = d.get("expert_dim", 0)
    if type(expert_dim) is not int or not (
        expert_dim == 0 or spec.n_embd <= expert_dim <= spec.n_embd + 1024
    ):
        raise _fail(path, f"expert_dim {expert_dim!r} for a model of {spec.n_embd}")
    moe = [i for i, m in enumerate(spec.moe_layers) if m]
    n_planes = len(plan.planes)
    dim = expert_dim or spec.n_embd
    part_bytes = [  # gate, up, down of each plane, as stored
        (expert_ffn * bt.row_bytes(dim),) * 2 + (dim * bt.row_bytes(expert_ffn),)
        for bt in plan.planes
    ]
    experts_d = _get(d, "experts", list, path)
    if len(experts_d) != spec.n_layer:
        raise _fail(
            path, f"experts lists {len(experts_d)} layers, spec has {spec.n_layer}"
        )
    experts = []
    for layer, per_layer in enumerate(experts_d):
        want = spec.n_expert if layer in moe else 0
        if not isinstance(per_layer, list) or len(per_layer) != want:
            n = _count(per_layer)
            raise _fail(path, f"layer {layer} lists {n} experts, expected {want}")
        rows = []
        for e, planes in enumerate(per_layer):
            if not isinstance(planes, list) or len(planes) != n_planes:
                raise _fail(
                    path, f"layer {layer} expert {e}: expected {n_planes} planes"
                )
            refs = []
            for p, r in enumerate(planes):
                try:
                    ref = PlaneRef(
                        _uint(r["shard"]),
                        _uint(r["offset"]),
                        _uint(r["length"]),
                        _uint(r["crc32"], 1 << 32),
                        tuple((_uint(o), _uint(n)) for o, n in r["parts"]),  # type: ignore[arg-type]
                    )
                except (TypeError, KeyError, ValueError):
                    raise _fail(
                        path, f"layer {layer} expert {e} plane {p}: bad entry"
                    ) from None
                if not 0 <= ref.shard < len(shards) or len(ref.parts) != 3:
                    raise _fail(
                        path,
                        f"layer {layer} expert {e} plane {p}: no shard {ref.shard}",
                    )
                if ref.offset < 0 or ref.offset + ref.length > shards[ref.shard].bytes:
                    raise _fail(
                        path,
                        f"layer {layer} expert {e} plane {p}: bytes "
                        f"{ref.offset}..{ref.offset + ref.length} outside "
                        f"{shards[ref.shard].file} ({shards[ref.shard].bytes} bytes)",
                    )
                if any(o < 0 or o + n > ref.length for o, n in ref.parts):
                    raise _fail(
                        path, f"layer {layer} expert {e} plane {p}: parts outside span"
                    )
                sizes = tuple(n for _, n in ref.parts)
                if sizes != part_bytes[p]:
                    raise _fail(
                        path,
                        f"layer {layer} expert {e} plane {p}: parts of {list(sizes)} "
                        f"bytes, expected {list(part_bytes[p])}",
                    )
                refs.append(ref)
            rows.append(tuple(refs))
        experts.append(tuple(rows))
    shifts = _get(d, "shifts", list, path)
    try:
        shifts = tuple(
            tuple(tuple(_uint(x, 64) for x in pp) for pp in s) for s in shifts
        )
        bad = len(shifts) != spec.n_layer or any(
            (len(s) != 3 or any(len(pp) != n_planes for pp in s)) if i in moe else s
            for i, s in enumerate(shifts)
        )
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise _fail(path, "shifts must be [layer][3 projections][planes] of 0..63")
    hot = _get(d, "hotness", list, path)
    protected = _get(d, "protected", list, path)
    if len(hot) != spec.n_layer or len(protected) != spec.n_layer:
        raise _fail(path, "hotness and protected need one entry per layer")
    try:
        hotness = tuple(
            tuple(Hotness(float(h["freq"]), float(h["weight"])) for h in row)
            for row in hot
        )
        prot = tuple(tuple(int(e) for e in row) for row in protected)
    except (TypeError, KeyError, ValueError, OverflowError):  # 10**39 -> float
        raise _fail(path, "hotness entries need freq and weight") from None
    if any(e < 0 or e >= spec.n_expert for row in prot for e in row):
        raise _fail(path, "protected lists an expert outside the model")
    for i, row in enumerate(hotness):
        # The cache and the cost model index a MoE layer's row by expert id.
        want = spec.n_expert if i in moe else 0
        if len(row) != want:
            raise _fail(
                path, f"hotness of layer {i} has {len(row)} entries, expected {want}"
            )
    # A ggml type, or a mix of them (converters/llama_gguf.py MIXES): only
    # reported; the backbone's GGUF states each tensor's own type.
    known = ("F16", "F32", "Q4_0", "Q4_K_M")
    if backbone_type not in BLOCK_TYPES and backbone_type not in known:
        raise _fail(path, f"backbone_type {backbone_type!r}")
    source = d.get("source") or {}
    template = d.get("chat_template")
    if not isinstance(source, dict):
        raise _fail(path, f"source must be an object, got {type(source).__name__}")
    if template is not None and not isinstance(template, str):
        raise _fail(path, "chat_template must be a string")
    tokenizer = _get(d, "tokenizer", str, path)
    if tokenizer not in ("hf", "gguf"):
        raise _fail(path, f"tokenizer must be 'hf' or 'gguf', got {tokenizer!r}")
    return Manifest(
        architecture=_get(d, "architecture", str, path),
        spec=spec,
        levels=plan.levels,
        expert_ffn=expert_ffn,
        expert_dim=expert_dim,
        shifts=shifts,
        backbone=_file_ref(_get(d, "backbone", dict, path), path, "backbone"),
        backbone_type=backbone_type,
        shards=shards,
        experts=tuple(experts),
        hotness=hotness,
        protected=prot,
        calibration=_get(d, "calibration", dict, path),
        tokenizer=tokenizer,
        chat_template=template,
        version=version,
        source=source,
    )
