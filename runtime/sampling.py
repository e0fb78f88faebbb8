"""Token sampling: repetition penalty, temperature, top-k, top-p, min-p, seeded.

Defaults and order follow llama.cpp's sampler chain (penalties, top-k, top-p,
min-p, temperature); temperature 0 is greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import ConfigError, ModelOutputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    """0 picks the most likely token (greedy)."""
    top_k: int = 40
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 0.95
    """Keep the smallest set whose probability reaches p; 1 keeps all."""
    min_p: float = 0.05
    """Drop tokens below min_p times the top token's probability."""
    repeat_penalty: float = 1.0
    """Divide positive (multiply negative) logits of recent tokens; 1 is off."""
    repeat_last_n: int = 64
    """How many recent tokens the penalty looks at; 0 disables it, -1 means the
    whole history (llama.cpp's convention)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        seed = self.seed
        if seed is not None and (type(seed) is not int or not 0 <= seed < 2**64):
            raise ConfigError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
        # Written so that NaN fails every check (comparisons with NaN are False).
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(
                f"temperature must be finite and >= 0, got {self.temperature}"
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if not (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty)):
            raise ConfigError(
                f"repeat_penalty must be finite and > 0, got {self.repeat_penalty}"
            )
        if self.repeat_last_n < -1:
            raise ConfigError(
                f"repeat_last_n must be >= -1 (-1: all, 0: off), got "
                f"{self.repeat_last_n}"
            )


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """Pick the next token from ``logits`` [V] given the tokens so far."""
        p = self.p
        logits = logits.astype(np.float64, copy=True)
        if not np.isfinite(logits).all():
            # Corrupt weights (a damaged file that still parses) give NaN or
            # infinity; no distribution can be sampled from them.
            bad = int((~np.isfinite(logits)).sum())
            raise ModelOutputError(
                f"the model's output has {bad} non-finite logits (NaN or "
                "infinity): its weights are probably corrupt"
            )
        if p.repeat_penalty != 1.0 and history and p.repeat_last_n != 0:
            window = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :]
            recent = np.unique(np.asarray(window, dtype=np.int64))
            vals = logits[recent]
            with np.errstate(over="ignore"):  # a tiny penalty: +-inf, clipped
                logits[recent] = np.where(
                    vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty
                )
            np.clip(logits, -1e300, 1e300, out=logits)
        if p.temperature == 0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            order = order[: p.top_k]
        cand = logits[order]
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, cand, probs = order[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            order, cand = order[keep], cand[keep]
        scaled = (cand - cand[0]) / p.temperature
        final = np.exp(scaled)
        final /= final.sum()
        return int(order[self.rng.choice(len(order), p=final)])
