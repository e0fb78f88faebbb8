"""Reading a converted-model directory: manifest, backbone, expert planes.

The backbone is a GGUF, mapped for converters and read into memory for a
running model (``in_memory``). Expert planes are read on
demand with one ``pread`` each and their CRC-32 checked, so a corrupt shard
is reported by file, layer, expert and plane the moment it is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgemoe.arch import family_for_gguf, family_for_hf
from edgemoe.checkpoint.base import Weight
from edgemoe.checkpoint.files import member, read_json
from edgemoe.errors import ModelFileError
from edgemoe.format.crc import crc32
from edgemoe.format.spec import BACKBONE, MANIFEST, PROJS, Manifest, PlaneRef


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    member(root, MANIFEST, "the manifest")
    return Manifest.from_json(read_json(path), str(path))


class EdgeCheckpoint:
    """An EdgeMoE model directory, read as a Checkpoint plus expert planes."""

    def __init__(self, path: str | Path, in_memory: bool = False):
        """``in_memory``: read the backbone, not map it (how models run)."""
        from edgemoe.checkpoint.gguf_file import GGUFCheckpoint

        self.root = Path(path)
        self.path = str(path)
        self.manifest = m = read_manifest(self.root)
        if m.backbone.file != BACKBONE:
            raise ModelFileError(
                self.root / MANIFEST,
                f"the backbone must be {BACKBONE!r}, got {m.backbone.file!r}",
            )
        for ref in (m.backbone, *m.shards):
            f = self.root / ref.file
            # A plain name, a regular file, no symlink out of the directory:
            # reads below may then open root / name.
            size = member(self.root, ref.file, "listed in manifest.json").st_size
            if size != ref.bytes:
                raise ModelFileError(
                    f,
                    f"truncated or replaced: {size} bytes, manifest says {ref.bytes}",
                )
        self.spec = m.spec
        self.architecture = m.architecture
        fmt = m.source.get("format", "hf")
        lookup = family_for_gguf if fmt == "gguf" else family_for_hf
        self.family = lookup(m.architecture, str(self.root / MANIFEST))
        # A running model reads its backbone, resident under every budget
        # anyway: a mapped file truncated mid-run is a SIGBUS inside ggml.
        self.backbone = GGUFCheckpoint(
            self.root / BACKBONE, backbone_only=True, spec=m.spec, in_memory=in_memory
        )
        self._fds: dict[int, int] = {}

    # -- the Checkpoint interface (backbone tensors) ----------------------------
    def names(self) -> list[str]:
        return self.backbone.names()

    def load(self, name: str) -> Weight:
        return self.backbone.load(name)

    def info(self, name: str):
        return self.backbone.info(name)

    @property
    def mmap(self) -> np.ndarray:
        return self.backbone.mmap

    # -- expert planes -----------------------------------------------------------
    def plane_ref(self, layer: int, expert: int, plane: int) -> PlaneRef:
        return self.manifest.experts[layer][expert][plane]

    def read_plane(self, layer: int, expert: int, plane: int) -> list[np.ndarray]:
        """Gate, up and down block bytes of one expert plane, CRC-checked."""
        ref = self.plane_ref(layer, expert, plane)
        shard = self.manifest.shards[ref.shard]
        path = self.root / shard.file
        try:
            fd = self._fds.get(ref.shard)
            if fd is None:
                fd = self._fds[ref.shard] = os.open(path, os.O_RDONLY)
            buf = os.pread(fd, ref.length, ref.offset)
        except OSError as e:
            raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None
        if len(buf) != ref.length:
            raise ModelFileError(
                path,
                f"truncated: layer {layer} expert {expert} plane {plane} needs "
                f"bytes {ref.offset}..{ref.offset + ref.length}",
            )
        data = np.frombuffer(buf, dtype=np.uint8)
        parts = [data[o : o + n] for o, n in ref.parts]
        crc = 0
        for part in parts:
            crc = crc32(part, crc)
        if crc != ref.crc32:
            raise ModelFileError(
                path,
                f"checksum mismatch in layer {layer} expert {expert} plane {plane} "
                f"(crc32 {crc:08x}, expected {ref.crc32:08x}): the shard is corrupt",
            )
        return parts

    def plane_shapes(self) -> dict[str, tuple[int, int]]:
        """(rows, row length) of each projection as stored."""
        d, f = self.manifest.stored_dim, self.manifest.expert_ffn
        return {"gate": (f, d), "up": (f, d), "down": (d, f)}

    def level_bytes(self) -> dict[int, int]:
        """Bytes to hold every routed expert at each level."""
        plan = self.manifest.plan
        shapes = self.plane_shapes()
        per_expert = {
            lv: sum(plan.level_bytes(lv, n, k) for n, k in shapes.values())
            for lv in plan.levels
        }
        n = len(self.manifest.moe_layers) * self.spec.n_expert
        return {lv: b * n for lv, b in per_expert.items()}

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self.backbone.close()


__all__ = ["EdgeCheckpoint", "PROJS", "is_model_dir", "read_manifest"]
