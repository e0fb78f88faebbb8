"""Hugging Face checkpoint directories: config.json + (sharded) safetensors.

Every source tensor is routed through the family's table before anything is
read, so a missing, extra or mis-shaped tensor is reported up front, by name.
Tensors are then read one at a time, widened to float32 into aligned memory;
per-expert tensors are written straight into their slot of the stacked array.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.arch import family_for_hf
from edgemoe.checkpoint import files
from edgemoe.checkpoint.base import (
    GGML_F32,
    GGML_MXFP4,
    Weight,
    aligned_empty,
    tensor_layout,
)
from edgemoe.checkpoint.safetensors import SafetensorsFile, bf16_to_f32
from edgemoe.errors import ConfigError, ModelFileError

# Buffers some exporters leave in checkpoints; they carry no weights we use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# config.json sizes every family reads (None where the key may be null). Checked
# here because the families do arithmetic on them before ModelSpec validates, and
# a "64" or a 0 would otherwise fail as a TypeError or ZeroDivisionError.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "decoder_sparse_step",
)
_NULLABLE = ("num_key_value_heads", "head_dim")  # null: derived from the others
_NUMBERS = ("rms_norm_eps", "rope_theta")


def read_json(path: Path) -> dict[str, Any]:
    # Regular file, size and depth capped (a 100,000-deep array was a
    # RecursionError); NaN passes to the field checks, which name the field.
    data = files.read_json(path, nan=True)
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


def _spec_from_config(family, config: dict[str, Any], path: Path):
    """``family.spec_from_hf`` with every failure a ConfigError naming the file."""
    for key in _POSITIVE_INTS:
        if key not in config or (config[key] is None and key in _NULLABLE):
            continue
        v = config[key]
        if type(v) is not int or v <= 0:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {v!r}")
    for key in _NUMBERS:
        v = config.get(key)
        if v is not None and type(v) not in (int, float):
            raise ConfigError(f"{path}: {key} must be a number, got {v!r}")
    try:
        return family.spec_from_hf(config)
    except ConfigError as e:
        msg = str(e).removeprefix("config.json: ")
        raise ConfigError(f"{path}: {msg}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:
        # A value of the wrong type somewhere the checks above do not cover.
        raise ConfigError(
            f"{path}: cannot read it as {family.hf_architectures[0]}: "
            f"{type(e).__name__}: {e}"
        ) from None


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
        self.spec = _spec_from_config(self.family, self.config, root / "config.json")
        self._files = self._open_files(root)
        self._sources = self._route()
        self._stacked: dict[str, Weight] = {}
        """The last three stacked expert tensors load_expert cut experts from
        (a layer's gate, up, down), so each is read once per layer."""

    def _open_files(self, root: Path) -> dict[str, SafetensorsFile]:
        index_path = root / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise ModelFileError(
                    index_path, "no 'weight_map' object of tensor -> file name"
                )
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
                routes = tmap.route(name)
                if not routes:
                    if not name.endswith(_IGNORED_SUFFIXES):
                        unknown.append(name)
                    continue
                for route in routes:
                    if route.name not in layout:
                        if route.name == "output.weight" and self.spec.tie_embeddings:
                            continue  # some tied checkpoints still store lm_head
                        unknown.append(name)
                        continue
                    sources[route.name].append((f, name, route.expert, route.part))
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ModelFileError(
                self.root,
                f"tensors not used by {self.architecture}: "
                f"{', '.join(sorted(unknown)[:5])}{more}",
            )
        missing = [n for n, (_, req) in layout.items() if req and n not in sources]
        if missing:
            # Name them as the checkpoint would (the first expert's, if stacked).
            hf = [
                (tmap.source_names(n, self.spec.n_expert) or [(n, None)])[0][0]
                for n in missing[:5]
            ]
            raise ModelFileError(
                self.root,
                f"missing tensors: {', '.join(hf)}"
                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""),
            )
        for name, pieces in sources.items():
            self._check_shapes(name, pieces, layout[name][0])
        return dict(sources)

    def _check_shapes(self, name: str, pieces: list, shape: tuple[int, ...]) -> None:
        stacked = pieces[0][2] is not None
        if stacked:
            n = shape[0]
            for f, src, e, _ in pieces:
                if e >= n:
                    raise ModelFileError(
                        f.path,
                        f"tensor {src!r} is expert {e}, but config.json has "
                        f"{n} experts (0..{n - 1})",
                    )
            experts = [p[2] for p in pieces]
            if len(set(experts)) != len(experts):
                raise ModelFileError(self.root, f"{name}: an expert is stored twice")
            missing = sorted(set(range(n)) - set(experts))
            if missing:
                srcs = dict(
                    (e, s) for s, e in self.family.tensor_map.source_names(name, n)
                )
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise ModelFileError(
                    self.root,
                    f"missing tensors: {', '.join(srcs[e] for e in missing[:3])}{more}",
                )
            want = shape[1:]
        elif any(part is not None and part.mxfp4 for *_, part in pieces):
            self._check_mxfp4(pieces)
            want = shape
        elif len(pieces) != 1:
            raise ModelFileError(self.root, f"{name}: stored more than once")
        else:
            want = shape
        for f, src, _, part in pieces:
            stored = f.tensors[src].shape
            got = stored if part is None else part.shape(stored, self.spec)
            # Size-1 axes may differ (a [1, D] gate stored for a [D] vector); any
            # other difference, a transposed matrix included, is a wrong tensor.
            if _squeezed(got) != _squeezed(want):
                what = f"expected {list(want)}"
                if part is not None:  # name the source's shape, not the cut's
                    what = f"which does not hold {name} of shape {list(want)}"
                raise ModelFileError(
                    f.path, f"tensor {src!r} has shape {list(stored)}, {what}"
                )

    def _check_mxfp4(self, pieces: list) -> None:
        """An MXFP4 tensor: its blocks and its scales, uint8, rows alike."""
        kinds = {part.mxfp4: (f, src) for f, src, _, part in pieces}
        srcs = [src for _, src, _, _ in pieces]
        for kind in ("blocks", "scales"):
            if kind not in kinds:
                have = srcs[0]
                other = have.rsplit("_", 1)[0] + "_" + kind
                raise ModelFileError(
                    self.root, f"missing tensors: {other} (the MXFP4 pair of {have})"
                )
        if len(pieces) != 2:
            raise ModelFileError(self.root, f"{srcs[0]}: stored more than once")
        for kind, (f, src) in kinds.items():
            meta = f.tensors[src]
            if meta.dtype != "U8":
                raise ModelFileError(
                    f.path, f"tensor {src!r} is {meta.dtype}, MXFP4 {kind} are U8"
                )
        (fb, b), (fs, sc) = kinds["blocks"], kinds["scales"]
        blocks, scales = fb.tensors[b].shape, fs.tensors[sc].shape
        if len(blocks) < 2 or blocks[-1] != 16 or tuple(blocks[:-1]) != tuple(scales):
            raise ModelFileError(
                fb.path,
                f"tensor {b!r} has shape {list(blocks)}: MXFP4 blocks of 16 bytes "
                f"for the scales {sc!r} of shape {list(scales)}",
            )

    def names(self) -> list[str]:
        return list(self._sources)

    def info(self, name: str) -> tuple[str, tuple[int, ...], int]:
        """(stored dtype, shape, stored bytes) without reading the data."""
        pieces = self._sources[name]
        metas = [(f.tensors[src], part) for f, src, _, part in pieces]
        dtypes = sorted({m.dtype for m, _ in metas})
        shape = tensor_layout(self.spec)[name][0]
        stored = sum(
            int((m.end - m.begin) * (part.fraction(m.shape, self.spec) if part else 1))
            for m, part in metas
        )
        return "/".join(dtypes), shape, stored

    def load(self, name: str) -> Weight:
        """Tensor ``name`` as aligned float32, expert tensors stacked ``[E, N, K]``."""
        pieces = self._sources[name]
        shape = tensor_layout(self.spec)[name][0]
        if pieces[0][3] is not None and pieces[0][3].mxfp4:
            return self._load_mxfp4(name, pieces, shape)
        out = aligned_empty(shape, np.float32)
        for f, src, expert, part in pieces:
            self._fill(out if expert is None else out[expert], f, src, part)
        return Weight(name, GGML_F32, shape, out)

    def experts_apart(self, name: str) -> bool:
        """Whether stacked expert tensor ``name`` is stored an expert per
        source tensor (``load_expert`` reads one alone), not as one stack."""
        return all(p[2] is not None for p in self._sources[name])

    def load_expert(self, name: str, e: int) -> Weight:
        """Expert ``e`` [N, K] of a stacked expert tensor, reading only its own
        source where the checkpoint stores experts apart (Mixtral, Qwen,
        OLMoE, DeepSeek): the converter then holds an expert, not a layer."""
        own = [p for p in self._sources[name] if p[2] == e]
        if not own:  # stacked in the file (gpt-oss): cut from the whole
            w = self._stacked.get(name)
            if w is None:
                w = self.load(name)
                self._stacked = dict(list(self._stacked.items())[-2:])
                self._stacked[name] = w
            return Weight(name, w.qtype, w.shape[1:], w.data[e].copy())
        f, src, _, part = own[0]
        shape = tensor_layout(self.spec)[name][0][1:]
        out = aligned_empty(shape, np.float32)
        self._fill(out, f, src, part)
        return Weight(name, GGML_F32, shape, out)

    def _fill(self, dst: np.ndarray, f, src: str, part) -> None:
        """Source tensor ``src`` of file ``f`` as float32 into ``dst``."""
        if part is not None:  # a cut of a stacked source (gpt-oss's gate_up)
            full = f.float32(src).reshape(f.tensors[src].shape)
            dst[...] = part.cut(full, self.spec)
        elif f.tensors[src].dtype == "BF16":
            bf16_to_f32(f.raw(src), dst)  # straight into the destination
        else:
            dst[...] = f.float32(src).reshape(dst.shape)
        f.release(src)

    def stored_type(self, name: str) -> int | None:
        """The ggml type to write ``name`` in as it is: MXFP4 experts stay
        MXFP4 (as llama.cpp's converter keeps gpt-oss's); None: the export's."""
        part = self._sources[name][0][3]
        return GGML_MXFP4 if part is not None and part.mxfp4 else None

    def _load_mxfp4(self, name: str, pieces: list, shape: tuple[int, ...]) -> Weight:
        """Stored MXFP4 experts as ggml's MXFP4 rows (the same codes and scale
        bytes, reordered): run as stored, dequantized only to convert."""
        from edgemoe.quant import mxfp4

        halves = {}
        for f, src, _, part in pieces:
            raw = f.raw(src).reshape(f.tensors[src].shape)
            halves[part.mxfp4] = part.cut(raw, self.spec)  # rows of gate or up
        data = aligned_empty((*shape[:-1], shape[-1] // 32 * 17), np.uint8)
        data[...] = mxfp4.ggml_from_hf(halves["blocks"], halves["scales"])
        for f, src, _, _ in pieces:
            f.release(src)
        return Weight(name, GGML_MXFP4, shape, data)

    def close(self) -> None:
        self._stacked = {}
        for f in self._files.values():
            f.close()


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)
