"""Hugging Face checkpoint directories: config.json + (sharded) safetensors.

Every source tensor is routed through the family's table before anything is
read, so a missing, extra or mis-shaped tensor is reported up front, by name.
Tensors are then read one at a time, widened to float32 into aligned memory;
per-expert tensors are written straight into their slot of the stacked array.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.arch import family_for_hf
from edgemoe.checkpoint.base import GGML_F32, Weight, aligned_empty, tensor_layout
from edgemoe.checkpoint.safetensors import SafetensorsFile
from edgemoe.errors import ConfigError, ModelFileError

# Buffers some exporters leave in checkpoints; they carry no weights we use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


class HFCheckpoint:
    """A model directory as written by ``save_pretrained``."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        root = Path(path)
        self.root = root
        self.config = read_json(root / "config.json")
        archs = self.config.get("architectures")
        if not archs or not isinstance(archs, list):
            raise ConfigError(f"{root / 'config.json'}: no 'architectures' list")
        self.architecture = str(archs[0])
        self.family = family_for_hf(self.architecture, str(root / "config.json"))
        self.spec = self.family.spec_from_hf(self.config)
        self._files = self._open_files(root)
        self._sources = self._route()

    def _open_files(self, root: Path) -> dict[str, SafetensorsFile]:
        index_path = root / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(index_path, "no 'weight_map' object")
            files = {
                f: SafetensorsFile(root / f) for f in sorted(set(weight_map.values()))
            }
            for name, fname in weight_map.items():
                if name not in files[fname].tensors:
                    raise ModelFileError(
                        root / fname, f"tensor {name!r} listed in the index is missing"
                    )
            return files
        paths = sorted(root.glob("*.safetensors"))
        if not paths:
            raise ModelFileError(root, "no *.safetensors files in the model directory")
        return {p.name: SafetensorsFile(p) for p in paths}

    def _route(self) -> dict[str, list[tuple[SafetensorsFile, str, int | None]]]:
        """Internal name -> its source pieces; checks names, counts and shapes."""
        tmap = self.family.tensor_map
        layout = tensor_layout(self.spec)
        sources: dict[str, list] = defaultdict(list)
        unknown = []
        for f in self._files.values():
            for name in f.tensors:
                route = tmap.route(name)
                if route is None:
                    if not name.endswith(_IGNORED_SUFFIXES):
                        unknown.append(name)
                    continue
                if route.name not in layout:
                    if route.name == "output.weight" and self.spec.tie_embeddings:
                        continue  # some tied checkpoints still store lm_head
                    unknown.append(name)
                    continue
                sources[route.name].append((f, name, route.expert))
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ModelFileError(
                self.root,
                f"tensors not used by {self.architecture}: "
                f"{', '.join(sorted(unknown)[:5])}{more}",
            )
        missing = [n for n, (_, req) in layout.items() if req and n not in sources]
        if missing:
            raise ModelFileError(
                self.root,
                f"missing tensors: {', '.join(missing[:5])}"
                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""),
            )
        for name, pieces in sources.items():
            self._check_shapes(name, pieces, layout[name][0])
        return dict(sources)

    def _check_shapes(self, name: str, pieces: list, shape: tuple[int, ...]) -> None:
        stacked = pieces[0][2] is not None
        if stacked:
            experts = sorted(p[2] for p in pieces)
            if experts != list(range(shape[0])):
                raise ModelFileError(
                    self.root,
                    f"{name}: expected experts 0..{shape[0] - 1}, "
                    f"found {len(experts)} ({pieces[0][1]} ...)",
                )
            want = shape[1:]
        elif len(pieces) != 1:
            raise ModelFileError(self.root, f"{name}: stored more than once")
        else:
            want = shape
        for f, src, _ in pieces:
            got = f.tensors[src].shape
            if got != want and int(np.prod(got)) != int(np.prod(want)):
                raise ModelFileError(
                    f.path,
                    f"tensor {src!r} has shape {list(got)}, expected {list(want)}",
                )

    def names(self) -> list[str]:
        return list(self._sources)

    def info(self, name: str) -> tuple[str, tuple[int, ...], int]:
        """(stored dtype, shape, stored bytes) without reading the data."""
        pieces = self._sources[name]
        metas = [f.tensors[src] for f, src, _ in pieces]
        dtypes = sorted({m.dtype for m in metas})
        shape = tensor_layout(self.spec)[name][0]
        return "/".join(dtypes), shape, sum(m.end - m.begin for m in metas)

    def load(self, name: str) -> Weight:
        """Tensor ``name`` as aligned float32, expert tensors stacked ``[E, N, K]``."""
        pieces = self._sources[name]
        shape = tensor_layout(self.spec)[name][0]
        out = aligned_empty(shape, np.float32)
        for f, src, expert in pieces:
            dst = out if expert is None else out[expert]
            if f.tensors[src].dtype == "BF16":
                # Widen straight into the destination: no float32 temporary.
                np.left_shift(
                    f.raw(src).astype(np.uint32).reshape(dst.shape),
                    16,
                    out=dst.view(np.uint32),
                )
            else:
                dst[...] = f.float32(src).reshape(dst.shape)
        return Weight(name, GGML_F32, shape, out)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
