"""Synthetic models that route like trained MoEs, for benchmarks.

A random router routes nothing like a trained one: it either spreads tokens
uniformly with no reuse, or concentrates on a few experts. Trained MoEs use
their experts nearly evenly over a long text, yet a short stretch of text
keeps coming back to a small working set (Qwen3-30B-A3B: median expert reuse
distance about 2 tokens; an LRU cache of 40% of the experts hits 90-95%).

``TopicRouting`` sets that up deliberately. Vocabulary ids are split among
``n_topics`` topics; each topic has, in every MoE layer, a *pool* of
``pool`` preferred experts. A token's embedding is its topic's centre plus
token-specific Gaussian noise, with the centre solved (least norm, across
all layers at once) so that every router scores the topic's pool ``gap``
noise standard deviations above the other experts: a token picks its top-k
mostly inside the pool, which member by its own noise. ``stream`` draws a
token stream as runs of one topic with geometric lengths (mean ``segment``),
topics uniform. So popularity is near-balanced over a long stream (pools are
random), a run reuses its pool (reuse distance of a few tokens) and a new
run brings a new working set (LRU misses).

For the routers to see the embedding, the residual stream must stay close to
it: attention and expert outputs are scaled by ``residual`` and norms are 1.
Compute cost does not depend on weight values, so the model still costs what
its shape costs. Legend: V vocabulary, D hidden, E experts, L MoE layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import ConfigError

FIRST_ID = 10
"""Streams avoid the lowest ids (special tokens in the synthetic vocab)."""


@dataclass(frozen=True)
class TopicRouting:
    n_topics: int = 128
    pool: int = 20
    """Preferred experts per topic and layer."""
    gap: float = 3.0
    """Pool advantage in router logits, in units of the token noise's std."""
    segment: float = 22.0
    """Mean length in tokens of a run of one topic."""
    residual: float = 0.02
    """Scale of attention and expert output weights (keeps routing on the
    embedding); 1 leaves them as drawn."""
    seed: int = 0

    def __post_init__(self) -> None:
        ints = ("n_topics", "pool", "seed")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"routing.{name} must be an integer >= 0, got {v!r}")
        for name in ("gap", "segment", "residual"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                raise ConfigError(f"routing.{name} must be a number > 0, got {v!r}")
        if self.n_topics < 1 or self.segment < 1:
            raise ConfigError("routing needs n_topics >= 1 and segment >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TopicRouting:
        if not isinstance(d, dict):
            raise ConfigError(f"routing must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown routing field(s) {unknown}")
        return cls(**d)

    def topics(self, n_vocab: int) -> np.ndarray:
        """[V] topic of each vocabulary id."""
        rng = np.random.default_rng([self.seed, 1])
        return rng.permutation(n_vocab) % self.n_topics

    def stream(self, n: int, n_vocab: int, seed: int = 0) -> list[int]:
        """``n`` token ids: runs of one topic, uniform ids within it."""
        topic_of = self.topics(n_vocab)
        ids = np.arange(n_vocab)
        members = [
            ids[(topic_of == t) & (ids >= FIRST_ID)] for t in range(self.n_topics)
        ]
        rng = np.random.default_rng([self.seed, 2, seed])
        out: list[int] = []
        while len(out) < n:
            run = int(rng.geometric(1.0 / self.segment))
            pool = members[int(rng.integers(self.n_topics))]
            if pool.size:
                out.extend(rng.choice(pool, run).tolist())
        return out[:n]


class RoutingDesign:
    """The tensors of one ``TopicRouting`` for one model shape; ``tensor``
    returns a designed tensor or None (the synthetic default applies)."""

    def __init__(self, routing: TopicRouting, spec):
        if not spec.n_expert_used < routing.pool < spec.n_expert:
            raise ConfigError(
                f"routing pool {routing.pool} must lie between the experts a "
                f"token uses ({spec.n_expert_used}) and a layer's experts "
                f"({spec.n_expert})"
            )
        self.routing, self.spec = routing, spec
        self._embed: np.ndarray | None = None
        self._routers: dict[int, np.ndarray] = {}

    def _build(self) -> None:
        r, s = self.routing, self.spec
        d, e = s.n_embd, s.n_expert
        layers = [i for i, moe in enumerate(s.moe_layers) if moe]
        rng = np.random.default_rng([r.seed, 3])
        # Routers with N(0, 1/D) entries: a unit-RMS input gives logits of
        # std ~1, so the token noise below has std ~1 in logit units.
        for i in layers:
            self._routers[i] = (rng.standard_normal((e, d)) / np.sqrt(d)).astype(
                np.float32
            )
        w = np.concatenate([self._routers[i] for i in layers])  # [L*E, D]
        target = np.zeros((r.n_topics, len(layers), e), dtype=np.float64)
        for t in range(r.n_topics):
            for j in range(len(layers)):
                target[t, j, rng.permutation(e)[: r.pool]] = r.gap
        target -= target.mean(axis=2, keepdims=True)  # no common offset to solve
        centres = target.reshape(r.n_topics, -1) @ np.linalg.pinv(w).T  # [topics, D]
        topic_of = r.topics(s.n_vocab)
        embed = rng.standard_normal((s.n_vocab, d), dtype=np.float32)  # [V, D]
        embed += centres[topic_of].astype(np.float32)
        self._embed = embed

    def tensor(self, name: str, shape: tuple[int, ...], drawn) -> np.ndarray | None:
        """The designed value of ``name``; ``drawn()`` gives the synthetic one
        (for the tensors only scaled here)."""
        if name.endswith("norm.weight"):
            return np.ones(shape, dtype=np.float32)
        if name.endswith(("attn_output.weight", "ffn_down_exps.weight")):
            return drawn() * np.float32(self.routing.residual)
        if name == "token_embd.weight" or name.endswith("ffn_gate_inp.weight"):
            if self._embed is None:
                self._build()
            if name == "token_embd.weight":
                return self._embed
            return self._routers[int(name.split(".")[1])]
        return None
