"""Token ids from callers, checked before they index anything: one
ConfigError naming the first bad id (np.asarray(..., int64) would truncate
1.5 and fail deep in numpy on "a"), or a ContextOverflowError."""

from __future__ import annotations

import numpy as np

from edgemoe.errors import ConfigError, ContextOverflowError
from edgemoe.runtime.engine import context_hint


def as_ids(token_ids, n_vocab: int) -> np.ndarray:
    """``token_ids`` as int64 (a 1-D check comes with ``check``)."""
    try:
        ids = np.asarray(token_ids)
    except (ValueError, TypeError) as e:  # ragged nesting
        raise ConfigError(f"token ids must be a 1-D sequence: {e}") from None
    if ids.size == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    if ids.dtype.kind not in "iu":
        # The caller's own items where we can: asarray turns [1, 2.5] into
        # [1.0, 2.5] and [1, "a"] into ["1", "a"].
        flat = (
            list(token_ids)
            if ids.ndim == 1 and not isinstance(token_ids, np.ndarray)
            else ids.ravel().tolist()
        )
        for i, t in enumerate(flat):
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                raise ConfigError(f"token ids must be integers, got {t!r} at index {i}")
        # All integers, some too large for int64.
        raise ConfigError(
            f"token id {max(flat, key=abs)} is outside the vocabulary 0..{n_vocab - 1}"
        )
    if ids.dtype.kind == "u" and ids.max() >= n_vocab:
        raise ConfigError(
            f"token id {int(ids.max())} is outside the vocabulary 0..{n_vocab - 1}"
        )
    return ids.astype(np.int64)


def check(ids: np.ndarray, pos: int, n_vocab: int, n_ctx: int, n_ctx_train: int):
    """1-D, inside the vocabulary, and ``pos + len`` within the context."""
    if ids.ndim != 1:
        raise ConfigError(f"token ids must be a 1-D sequence, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise ConfigError(f"token id {bad} is outside the vocabulary 0..{n_vocab - 1}")
    if pos + ids.size > n_ctx:
        raise ContextOverflowError(
            f"{pos + ids.size} tokens do not fit the context of {n_ctx} "
            f"tokens ({context_hint(n_ctx, n_ctx_train)})"
        )
