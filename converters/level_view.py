"""An EdgeMoE model seen as a plain checkpoint at one level, for ``export-gguf``.

Backbone tensors keep the type they are stored in (the user chose it at
conversion). Routed experts are the level's weights: when the level is a
single plane of the requested type and the FFN needed no padding, the plane's
blocks are copied with their fp16 scales rescaled by the plane's power-of-two
shift (exact whenever the result stays a normal fp16, checked per tensor);
otherwise the level is reconstructed in float32 and quantized to the type.
"""

from __future__ import annotations

import numpy as np

from edgemoe.checkpoint.base import GGML_F32, Weight, tensor_layout
from edgemoe.format.spec import PROJS
from edgemoe.quant.nested import dequantize_plane

# Byte offsets of the fp16 scale fields inside one block, per ggml type.
_F16_FIELDS = {"Q2_K": (80, 82), "Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


def rescale_blocks(raw: np.ndarray, type_name: str, nbytes: int, shift: int):
    """Blocks with every fp16 scale times 2**-shift, or None if not exact."""
    blocks = raw.reshape(-1, nbytes).copy()
    for off in _F16_FIELDS[type_name]:
        f = blocks[:, off : off + 2].copy().view(np.float16).astype(np.float32)
        scaled = f * np.float32(2.0**-shift)
        stored = scaled.astype(np.float16)
        if not np.array_equal(stored.astype(np.float32), scaled):
            return None
        blocks[:, off : off + 2] = stored.view(np.uint8)
    return blocks.reshape(raw.shape)


class LevelCheckpoint:
    """``names()``/``load()`` of the model as llama.cpp would store it."""

    def __init__(self, ckpt, level: int | None, target: str):
        self._ckpt = ckpt
        m = ckpt.manifest
        self.level = m.levels[-1] if level is None else level
        self.n_planes = m.plan.n_planes(self.level)
        self.target = target
        self.spec, self.family, self.path = ckpt.spec, ckpt.family, ckpt.path
        self.root = ckpt.root if m.tokenizer == "hf" else None
        if m.tokenizer == "gguf":
            self.tokenizer_fields = ckpt.backbone.tokenizer_fields
        self._backbone = set(ckpt.names())

    def names(self) -> list[str]:
        layout = tensor_layout(self.spec)
        return [n for n, (_, req) in layout.items() if req or n in self._backbone]

    def stored_type(self, name: str) -> int | None:
        """Backbone tensors are written in the type they are stored in."""
        if name in self._backbone:
            return int(self._ckpt.backbone._tensors[name].tensor_type)
        return None

    def load(self, name: str) -> Weight:
        if name in self._backbone:
            return self._ckpt.load(name)
        layer = int(name.split(".")[1])
        proj = PROJS.index(name.split(".")[2].split("_")[1])
        shape = tensor_layout(self.spec)[name][0]  # [E, N, K] at the true FFN
        exact = self._copy_plane(name, layer, proj, shape)
        if exact is not None:
            return exact
        m = self._ckpt.manifest
        out = np.empty(shape, dtype=np.float32)
        for e in range(self.spec.n_expert):
            level = np.zeros(self._ckpt.plane_shapes()[PROJS[proj]], dtype=np.float32)
            for p in range(self.n_planes):
                raw = self._ckpt.read_plane(layer, e, p)[proj]
                bt = m.plan.planes[p]
                n, k = self._ckpt.plane_shapes()[PROJS[proj]]
                level = level + dequantize_plane(
                    raw.reshape(n, -1), bt.name, m.shifts[layer][proj][p]
                )
            out[e] = level[: shape[1], : shape[2]]
        return Weight(name, GGML_F32, shape, out)

    def _copy_plane(self, name: str, layer: int, proj: int, shape) -> Weight | None:
        m = self._ckpt.manifest
        bt = m.plan.planes[0]
        single = self.n_planes == 1 and bt.name == self.target
        if not single or (m.expert_ffn, m.stored_dim) != (
            self.spec.expert_ffn,
            self.spec.n_embd,
        ):
            return None
        shift = m.shifts[layer][proj][0]
        n, k = self._ckpt.plane_shapes()[PROJS[proj]]
        out = np.empty((self.spec.n_expert, n, bt.row_bytes(k)), dtype=np.uint8)
        for e in range(self.spec.n_expert):
            raw = self._ckpt.read_plane(layer, e, 0)[proj].reshape(n, -1)
            scaled = rescale_blocks(raw, bt.name, bt.nbytes, shift)
            if scaled is None:
                return None
            out[e] = scaled
        return Weight(name, bt.ggml, tuple(shape), out)

    def close(self) -> None:
        self._ckpt.close()
