"""``SamplingParams``: how one completion is sampled and when it ends.

The one type every front end fills (the CLI's flags, the chat's ``/set``, the
server's request) and the engine reads; light, so the front ends import it
without the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from edgemoe.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    """Upper bound on generated tokens."""
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
    """None draws a random seed."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; not emitted. One string is one stop string,
    not a set of characters."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens."""

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif stop is None:
            stop = ()
        elif not isinstance(stop, (list, tuple)):
            raise ConfigError(
                f"stop must be a string or a list of strings, got {stop!r}"
            )
        if not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if type(self.max_tokens) is not int:
            raise ConfigError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {self.max_tokens}")
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

    @classmethod
    def make(cls, base: SamplingParams | None = None, **changes) -> SamplingParams:
        """``base`` (or the defaults) with ``changes``; an unknown name is one
        ConfigError listing the known ones (``max_token=3`` is a typo, not a no-op)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {unknown}; known: {known}")
        return cls(**{**(vars(base) if base is not None else {}), **changes})

    def describe(self) -> str:
        """One line of the settings, as the chat's ``/set`` shows them."""
        seed = "random" if self.seed is None else self.seed
        return (
            f"temp {self.temperature:g} · top-k {self.top_k} · top-p {self.top_p:g} · "
            f"min-p {self.min_p:g} · n-predict {self.max_tokens} · seed {seed} · "
            f"repeat-penalty {self.repeat_penalty:g} · repeat-last-n "
            f"{self.repeat_last_n} · ignore-eos {'on' if self.ignore_eos else 'off'}"
        )
