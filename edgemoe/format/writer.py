"""Writing a converted-model directory, atomically, as a state machine.

Everything goes into a hidden sibling directory; ``finish`` writes the
manifest last and renames the directory into place. A failed or interrupted
run leaves no directory that loads as a model, and never touches an existing
output unless ``force`` (then it is replaced only once the new one is whole).
One writer per output at a time (``edgemoe.format.lock``); each removes what
killed ones left. Calls out of order raise, as gguf's own writer does.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.format.crc import crc32
from edgemoe.format.lock import OutputLock, pid_alive
from edgemoe.format.spec import (
    ALIGNMENT,
    BACKBONE,
    MANIFEST,
    PROJS,
    SHARD,
    FileRef,
    Manifest,
    PlaneRef,
    expert_tensor_name,
)
from edgemoe.quant.types import BlockType


class WriterState(enum.Enum):
    NEW = 1
    BACKBONE = 2
    EXPERTS = 3
    DONE = 4
    FAILED = 5


@dataclasses.dataclass(frozen=True)
class _Slot:
    layer: int
    expert: int
    plane: int
    shard: int


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _disk_error(path: Path, e: OSError) -> ModelFileError:
    if e.errno == errno.ENOSPC:
        return ModelFileError(path, "no space left on the device")
    return ModelFileError(path, f"cannot write: {e.strerror or e}")


class ModelWriter:
    """Builds ``out`` in a temporary sibling; see the module docstring.

    Order: ``write_backbone`` -> ``begin_experts`` -> ``add_plane`` for every
    (layer, expert, plane) in that order -> ``finish``. Use as a context
    manager: an exception aborts and removes the temporary directory.
    """

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out)
        parent = self.out.parent
        if not parent.is_dir():
            raise ModelFileError(parent, "output's parent directory does not exist")
        # Held until ``finish`` or ``abort``: the checks below and the final
        # rename must not interleave with another writer's.
        self.lock = OutputLock(self.out)
        try:
            self._recover_old()
            if self.out.exists() and not force:
                raise ModelFileError(
                    self.out, "already exists (use --force to replace it)"
                )
            if self.out.exists() and not self.out.is_dir():
                raise ModelFileError(self.out, "exists and is not a directory")
            self.lock.remove_stale()
            self.tmp = parent / f".{self.out.name}.partial-{os.getpid()}"
            try:
                self.tmp.mkdir()
            except OSError as e:
                raise _disk_error(self.tmp, e) from None
        except BaseException:
            self.lock.release()
            raise
        self.state = WriterState.NEW
        self.backbone: FileRef | None = None
        self._shards: list[dict[str, Any]] = []
        self._order: list[_Slot] = []
        self._next = 0
        self._gguf = None
        self._crc: dict[tuple[int, int, int], int] = {}

    def _expect(self, *states: WriterState) -> None:
        if self.state not in states:
            raise ConfigError(
                f"model writer: expected state {[s.name for s in states]}, "
                f"got {self.state.name}"
            )

    # -- backbone ------------------------------------------------------------
    def write_backbone(self, write: Callable[[Path], Any]) -> FileRef:
        """``write(path)`` writes the backbone GGUF at ``path``."""
        self._expect(WriterState.NEW)
        path = self.tmp / BACKBONE
        try:
            write(path)
            self.backbone = FileRef(BACKBONE, path.stat().st_size, sha256_of(path))
        except OSError as e:
            raise _disk_error(path, e) from None
        self.state = WriterState.BACKBONE
        return self.backbone

    def copy_file(self, src: Path) -> None:
        """Carry a source file (tokenizer.json ...) into the model directory."""
        try:
            shutil.copyfile(src, self.tmp / src.name)
        except OSError as e:
            raise _disk_error(self.tmp / src.name, e) from None

    # -- experts -------------------------------------------------------------
    def begin_experts(
        self,
        layers: list[int],
        n_expert: int,
        planes: tuple[BlockType, ...],
        shapes: dict[str, tuple[int, int]],
        max_shard_bytes: int = 2 << 30,
    ) -> None:
        """Lay out every expert tensor: ``shapes[proj] = (rows, row length)``.

        Layers are never split across shards, so a layer's planes share a file.
        """
        self._expect(WriterState.BACKBONE)
        import gguf

        per_plane = [
            sum(p.row_bytes(k) * n + ALIGNMENT for n, k in shapes.values())
            for p in planes
        ]
        layer_bytes = n_expert * sum(per_plane)
        groups: list[list[int]] = []
        size = 0
        for layer in layers:
            if not groups or (size + layer_bytes > max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(layer)
            size += layer_bytes
        for s, group in enumerate(groups):
            path = self.tmp / SHARD.format(s + 1)
            w = gguf.GGUFWriter(path, "edgemoe")
            w.add_custom_alignment(ALIGNMENT)
            w.add_uint32("edgemoe.shard", s)
            w.add_uint32("edgemoe.shard_count", len(groups))
            for layer in group:
                for e in range(n_expert):
                    for p, bt in enumerate(planes):
                        self._order.append(_Slot(layer, e, p, s))
                        for proj in PROJS:
                            n, k = shapes[proj]
                            w.add_tensor_info(
                                expert_tensor_name(layer, e, p, proj),
                                (n, bt.row_bytes(k)),
                                np.dtype(np.uint8),
                                bt.row_bytes(k) * n,
                                raw_dtype=gguf.GGMLQuantizationType(bt.ggml),
                            )
            self._shards.append({"path": path, "writer": w, "opened": False})
        self._planes = planes
        self._shapes = shapes
        self.state = WriterState.EXPERTS

    def add_plane(
        self, layer: int, expert: int, plane: int, parts: list[np.ndarray]
    ) -> None:
        """The next plane's gate, up and down block bytes, in layout order."""
        self._expect(WriterState.EXPERTS)
        if self._next >= len(self._order):
            raise ConfigError("model writer: more planes than laid out")
        slot = self._order[self._next]
        if (slot.layer, slot.expert, slot.plane) != (layer, expert, plane):
            raise ConfigError(
                f"model writer: expected layer {slot.layer} expert {slot.expert} "
                f"plane {slot.plane}, got {layer}/{expert}/{plane}"
            )
        bt = self._planes[plane]
        shard = self._shards[slot.shard]
        crc = 0
        try:
            if not shard["opened"]:
                if slot.shard > 0:
                    self._close_shard(slot.shard - 1)
                w = shard["writer"]
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                shard["opened"] = True
            for proj, data in zip(PROJS, parts):
                n, k = self._shapes[proj]
                if data.dtype != np.uint8 or data.shape != (n, bt.row_bytes(k)):
                    raise ConfigError(
                        f"model writer: {proj} of layer {layer} expert {expert} plane "
                        f"{plane} is {data.dtype}{list(data.shape)}, expected "
                        f"uint8[{n}, {bt.row_bytes(k)}]"
                    )
                data = np.ascontiguousarray(data)
                crc = crc32(data, crc)
                shard["writer"].write_tensor_data(data)
        except OSError as e:
            raise _disk_error(shard["path"], e) from None
        self._crc[layer, expert, plane] = crc
        self._next += 1

    def _close_shard(self, s: int) -> None:
        shard = self._shards[s]
        if shard.get("closed"):
            return
        w = shard["writer"]
        w.close()
        shard["closed"] = True

    # -- finish --------------------------------------------------------------
    def finish(
        self,
        manifest_fields: dict[str, Any],
        before_commit: Callable[[Path], Any] | None = None,
    ) -> Manifest:
        """Index the shards, write the manifest and move the directory into
        place. ``before_commit(dir)`` adds files to the complete model (an
        ONNX export) before it moves, still under the lock."""
        self._expect(WriterState.EXPERTS)
        if self._next != len(self._order):
            raise ConfigError(
                f"model writer: {len(self._order) - self._next} planes never written"
            )
        try:
            for s in range(len(self._shards)):
                self._close_shard(s)
            shard_refs, by_layer = self._index()
            experts = tuple(
                tuple(tuple(by_layer[i][e]) for e in sorted(by_layer[i]))
                if i in by_layer
                else ()
                for i in range(manifest_fields["spec"].n_layer)
            )
            manifest = Manifest(
                backbone=self.backbone,
                shards=shard_refs,
                experts=experts,
                **manifest_fields,
            )
            text = json.dumps(manifest.to_json(), indent=1)
            (self.tmp / MANIFEST).write_text(text)
            if before_commit is not None:
                before_commit(self.tmp)
            self._move_into_place()
        except OSError as e:
            raise _disk_error(self.tmp, e) from None
        self.state = WriterState.DONE
        self.lock.release()
        return manifest

    def _index(self) -> tuple[tuple[FileRef, ...], dict]:
        from gguf import GGUFReader

        refs: list[FileRef] = []
        offsets: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(self._shards):
            path = shard["path"]
            reader = GGUFReader(path)
            for t in reader.tensors:
                offsets[t.name] = (s, int(t.data_offset), int(t.n_bytes))
            del reader
            refs.append(FileRef(path.name, path.stat().st_size, sha256_of(path)))
        layers: dict[int, dict[int, list[PlaneRef]]] = {}
        for slot in self._order:
            spans = [
                offsets[expert_tensor_name(slot.layer, slot.expert, slot.plane, p)]
                for p in PROJS
            ]
            start = spans[0][1]
            end = spans[-1][1] + spans[-1][2]
            ref = PlaneRef(
                shard=spans[0][0],
                offset=start,
                length=end - start,
                crc32=self._crc[slot.layer, slot.expert, slot.plane],
                parts=tuple((o - start, n) for _, o, n in spans),  # type: ignore[arg-type]
            )
            layers.setdefault(slot.layer, {}).setdefault(slot.expert, []).append(ref)
        return tuple(refs), layers

    def _recover_old(self) -> None:
        """A writer killed inside ``_move_into_place`` left ``.{name}.old-{pid}``:
        the previous model, which goes back to ``out`` if the new one never
        arrived, and is removed if it did."""
        pattern = re.compile(re.escape(f".{self.out.name}.old-") + r"(\d+)")
        try:
            names = sorted(os.listdir(self.out.parent))
        except OSError:
            return
        for name in names:
            m = pattern.fullmatch(name)
            old = self.out.parent / name
            if m is None or old.is_symlink() or not old.is_dir():
                continue
            if not self.lock.held and pid_alive(int(m[1])):
                continue  # unlocked (no flock here): it may still be in use
            try:
                if os.path.lexists(self.out):
                    shutil.rmtree(old)
                else:
                    os.replace(old, self.out)
            except OSError as e:
                raise _disk_error(old, e) from None

    def _move_into_place(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if old is not None:  # the previous model goes back where it was
                os.replace(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.state is WriterState.DONE:
            return
        for shard in self._shards:
            try:
                shard["writer"].close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.release()
        self.state = WriterState.FAILED

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Also on a normal exit that never reached ``finish``: no half-built
        # directory outlives the run, and the lock goes with it.
        self.abort()
