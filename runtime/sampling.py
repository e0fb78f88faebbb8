"""Token sampling: repetition penalty, temperature, top-k, top-p, min-p, seeded.

Defaults and order follow llama.cpp's sampler chain (penalties, top-k, top-p,
min-p, temperature); temperature 0 is greedy.
"""

from __future__ import annotations

import numpy as np

from edgemoe.errors import ModelOutputError
from edgemoe.sampling_params import SamplingParams


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
