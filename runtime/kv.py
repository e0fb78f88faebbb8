"""Per-request state: the KV cache's cells and the sequences that own them.

The cache is one pool of ``n_ctx`` cells per layer shared by every sequence,
as llama.cpp's unified KV cache: a token's keys and values go to a free cell,
and each token attends to the cells its sequence owns at positions up to its
own (a mask the host builds per step; ggml's flash attention skips the cells
it hides). A lone sequence fills cells 0, 1, 2 ... in order. Keys and values
are stored a cell per row.
Legend: C cells (n_ctx), Dkv = kv heads x head dim, T tokens in a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemoe.checkpoint.base import GGML_F16, GGML_F32, Weight, aligned_empty
from edgemoe.errors import ConfigError, ContextOverflowError

KV_PAD = 256
"""Attention spans the first n_kv cells, rounded up to this: a decode graph is
then reused for 256 tokens instead of rebuilt for every new length."""


@dataclass
class Sequence:
    """One request's tokens and where their keys and values are."""

    id: int
    tokens: list[int] = field(default_factory=list)
    """Token ids whose keys and values the cache holds, in position order."""
    cells: list[int] = field(default_factory=list)
    """cells[pos]: the cache cell of position ``pos``."""
    expert_uses: dict[int, np.ndarray] = field(default_factory=dict)
    """MoE layer -> times each expert ran for this sequence's tokens [E]."""

    @property
    def n_past(self) -> int:
        return len(self.cells)


KV_TYPES = {"f16": (np.float16, GGML_F16), "f32": (np.float32, GGML_F32)}


def cache_dims(spec) -> tuple[int, int]:
    """Floats a token keeps per layer: (keys, values). MLA keeps its normed
    latent and RoPE key in one row that serves as both (values are the
    latent's first ``kv_lora_rank`` floats)."""
    if spec.attention == "mla":
        return spec.kv_lora_rank + spec.head_dim, 0
    d = spec.n_head_kv * spec.head_dim
    return d, d


class KVCache:
    """Keys and values ``[C, Dkv]`` (ggml ne (Dkv, C)) of every layer as
    ggml tensors (``kv_type``), plus cell ownership."""

    def __init__(
        self, spec, n_ctx: int, weights, commit: bool = False, kv_type: str = "f32"
    ):
        """``weights``: the WeightSet the tensors join (zero-copy on the CPU,
        uploaded once elsewhere); ``commit``: touch every page now (a budget
        counts the whole cache up front instead of as it fills)."""
        self.n_cells = n_ctx
        self.kv_dim, v_dim = cache_dims(spec)
        self.k, self.v = [], []
        self._arrays = []
        # float32 by default (exact); float16 as llama.cpp's default cache.
        dtype, qtype = KV_TYPES[kv_type]

        def rows(name: str, dim: int):
            # calloc maps pages lazily: memory grows with the cells used.
            a = aligned_empty((n_ctx, dim), dtype, zeros=True)
            if commit:
                a.fill(0)
            self._arrays.append(a)
            return weights.add(Weight(name, qtype, a.shape, a))

        for il in range(spec.n_layer):
            self.k.append(rows(f"cache_k.{il}", self.kv_dim))
            if v_dim:  # MLA's values are a view of its key rows
                self.v.append(rows(f"cache_v.{il}", v_dim))
        self.seq_of = np.full(n_ctx, -1, dtype=np.int64)  # owner, -1 free
        self.pos_of = np.zeros(n_ctx, dtype=np.int64)
        self.sequences: dict[int, Sequence] = {}
        self._next_id = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays)

    # -- sequences -------------------------------------------------------------
    def new_sequence(self) -> Sequence:
        seq = Sequence(self._next_id)
        self.sequences[seq.id] = seq
        self._next_id += 1
        return seq

    def get(self, seq_id) -> Sequence:
        seq = self.sequences.get(seq_id) if isinstance(seq_id, int) else None
        if seq is None:
            raise ConfigError(
                f"sequence {seq_id!r} does not exist; live sequences: "
                f"{sorted(self.sequences)}"
            )
        return seq

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep the first ``n`` positions of ``seq``; free the cells of the rest."""
        for c in seq.cells[n:]:
            self.seq_of[c] = -1
        del seq.cells[n:], seq.tokens[n:]

    def free(self, seq: Sequence) -> None:
        self.truncate(seq, 0)
        self.sequences.pop(seq.id, None)

    @property
    def n_free(self) -> int:
        return int((self.seq_of < 0).sum())

    def place(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Cells for ``tokens`` appended to ``seq`` (lowest free first: a lone
        sequence gets cell = position). Raises before anything changes if
        they do not fit."""
        free = np.nonzero(self.seq_of < 0)[0]
        if len(tokens) > free.size:
            raise ContextOverflowError(
                f"{seq.n_past + len(tokens)} tokens do not fit the context of "
                f"{self.n_cells} tokens ({free.size} free cells)"
            )
        cells = free[: len(tokens)].tolist()
        pos = seq.n_past
        for i, c in enumerate(cells):
            self.seq_of[c] = seq.id
            self.pos_of[c] = pos + i
        seq.cells.extend(cells)
        seq.tokens.extend(tokens)
        return cells

    def n_kv(self) -> int:
        """Cells attention must span: up to the last owned one, padded."""
        used = np.nonzero(self.seq_of >= 0)[0]
        top = int(used[-1]) + 1 if used.size else 1
        return min(self.n_cells, -(-top // KV_PAD) * KV_PAD)

    def mask(
        self, seq_ids: np.ndarray, pos: np.ndarray, n_kv: int, window: int | None
    ) -> np.ndarray:
        """[T, n_kv] float16 (flash attention's mask type): 0 where token t
        may attend to cell c (its own sequence, an earlier or equal position,
        inside the sliding window), else -inf."""
        owner = self.seq_of[None, :n_kv]
        cpos = self.pos_of[None, :n_kv]
        ok = (owner == seq_ids[:, None]) & (cpos <= pos[:, None])
        if window:
            ok &= cpos > pos[:, None] - window
        return np.where(ok, np.float16(0), np.float16(-np.inf))
