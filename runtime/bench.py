"""``edgemoe bench``: llama-bench-style prompt and generation throughput, with
the offloading figures (stall, bytes read per token, cache hits) alongside.

As llama-bench does, ``pp`` evaluates ``n_prompt`` tokens in one batch and
``tg`` evaluates ``n_gen`` tokens one at a time, each on a fresh context, with
the next token drawn at random rather than sampled: a random-weight model's
greedy output repeats a few tokens, which would hide every cache miss. A
``tokens`` stream (held-out text) gives natural routing locality instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgemoe.errors import ConfigError


@dataclass
class BenchResult:
    test: str
    """"pp128" (prompt processing) or "tg64" (text generation), as llama-bench."""
    tokens: int
    tps: list[float] = field(default_factory=list)
    stall_fraction: list[float] = field(default_factory=list)
    read_per_token: list[float] = field(default_factory=list)
    expert_bytes_per_token: list[float] = field(default_factory=list)
    hit_rate: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        def mean_sd(xs):
            if not xs:
                return 0.0, 0.0
            return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

        tps, sd = mean_sd(self.tps)
        return {
            "test": self.test,
            "tps": tps,
            "tps_sd": sd,
            "tps_runs": list(self.tps),
            "read_per_token_runs": list(self.read_per_token),
            "hit_rate_runs": list(self.hit_rate),
            "stall_fraction": mean_sd(self.stall_fraction)[0],
            "read_per_token": mean_sd(self.read_per_token)[0],
            "expert_bytes_per_token": mean_sd(self.expert_bytes_per_token)[0],
            "hit_rate": mean_sd(self.hit_rate)[0],
        }


def bench(
    model,
    n_prompt: int = 128,
    n_gen: int = 64,
    reps: int = 2,
    seed: int = 0,
    tokens: list[int] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[BenchResult]:
    """``pp<n_prompt>`` and ``tg<n_gen>`` results (either may be 0 to skip),
    ``reps`` repetitions each after one small warm-up.

    Args:
        progress: called as ``progress(test, tokens done, tokens in all)``
            after each repetition, outside the timed spans.
        tokens: the token stream to evaluate (e.g. tokenized text); by default
            random ids. Each repetition takes the next stretch of it: repeating
            a stretch would replay the same expert accesses in a cycle, which
            no real stream does (and which defeats any recency-based cache).
    """
    from edgemoe.runtime.metrics import StepCounter

    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0 or reps < 1:
        raise ConfigError(
            f"bench needs n_prompt, n_gen >= 0 (not both 0) and reps >= 1; got "
            f"{n_prompt}, {n_gen}, {reps}"
        )
    need = max(n_prompt, n_gen)
    if need > model.n_ctx:
        raise ConfigError(
            f"bench needs a context of {need} tokens; the model was loaded with "
            f"n_ctx {model.n_ctx} (raise --ctx)"
        )
    stream = _stream(model, tokens, need * reps, seed)
    counter = StepCounter(model)

    model.reset()  # warm-up: build the graphs, as llama-bench does
    model.eval(stream[: min(8, n_prompt or 1)])
    model.eval(stream[:1])
    results = []
    total, done = reps * (n_prompt + n_gen), 0

    def advance(test: str, n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(test, done, total)

    if n_prompt:
        pp = BenchResult(f"pp{n_prompt}", n_prompt)
        for r in range(reps):
            model.reset()
            counter.step()
            t0 = time.perf_counter()
            model.eval(stream[r * n_prompt : (r + 1) * n_prompt])
            _add(pp, time.perf_counter() - t0, [counter.step()], n_prompt)
            advance(pp.test, n_prompt)
        results.append(pp)
    if n_gen:
        tg = BenchResult(f"tg{n_gen}", n_gen)
        for r in range(reps):
            model.reset()
            counter.step()
            steps = []
            t0 = time.perf_counter()
            for tok in stream[r * n_gen : (r + 1) * n_gen]:
                model.eval([tok])
                steps.append(counter.step())
            _add(tg, time.perf_counter() - t0, steps, n_gen)
            advance(tg.test, n_gen)
        results.append(tg)
    return results


def _stream(model, tokens, n: int, seed: int) -> list[int]:
    if tokens is None:
        hi = min(model.spec.n_vocab, 32000)
        return np.random.default_rng(seed).integers(10, hi, n).tolist()
    if len(tokens) < n:
        raise ConfigError(
            f"bench text has {len(tokens)} tokens; {n} are needed (the larger "
            f"of n_prompt and n_gen, times the repetitions)"
        )
    return list(tokens)


def _add(res: BenchResult, seconds: float, steps, tokens: int) -> None:
    from edgemoe.runtime.metrics import StepTotals

    t = StepTotals.of(steps)
    res.tps.append(tokens / seconds)
    res.stall_fraction.append(t.stall_ms / 1e3 / seconds)
    res.read_per_token.append(t.bytes_read / tokens)
    res.expert_bytes_per_token.append(t.expert_bytes / tokens)
    res.hit_rate.append(t.hit_rate)
