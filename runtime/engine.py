"""The generation loop: prefill, then decode one token at a time, streaming.

Yields plain dataclasses; nothing here knows how they are shown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgemoe.errors import ConfigError, ContextOverflowError
from edgemoe.runtime.metrics import MemoryStats, StepCounter, StepMetrics, memory_stats
from edgemoe.runtime.sampling import Sampler
from edgemoe.sampling_params import SamplingParams


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    """Prompt tokens evaluated (not counting ``cached_tokens``)."""
    prompt_s: float
    generation_tokens: int
    generation_s: float
    ttft_s: float
    cached_tokens: int = 0
    """Prompt tokens whose keys and values the previous call left in the
    cache (the common prefix, as llama.cpp's prompt cache): not evaluated."""

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return (
            self.generation_tokens / self.generation_s if self.generation_s > 0 else 0.0
        )


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed step: new text, the token that produced it, and stats so far."""

    text: str
    token: int | None
    timings: Timings
    memory: MemoryStats
    finish_reason: str | None = None
    """None while generating; "stop" (EOS or a stop string), "length"
    (max_tokens) or "context" (context full) on the last chunk."""
    metrics: StepMetrics | None = None
    """This step's compute, I/O, stalls and expert-cache traffic (the first
    chunk's cover the prompt)."""


class _Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character and keeps
    tokenizers' context-dependent spacing (decode a window, diff the text)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


@dataclass
class _StopMatcher:
    """Holds back text that might begin a stop string until it is decided."""

    stops: Sequence[str]
    buf: str = ""
    hit: bool = field(default=False)

    def feed(self, text: str) -> str:
        self.buf += text
        # The earliest match wins, whatever the order of ``stops``: one step can
        # complete several (a token "test" with stops "st" and "te").
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buf, self.hit = self.buf[: min(found)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold :]
        return out


class Completion:
    """One completion's text, token by token: UTF-8 and stop strings held
    back until decided, EOS, and the ``max_tokens`` cap. ``generate`` and the
    server's scheduler share it; each decides when its context is full."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids):
        self.detok = _Detokenizer(tokenizer)
        self.stops = _StopMatcher(params.stop)
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self.max_tokens = params.max_tokens
        self.n = 0
        """Tokens generated (EOS not counted)."""

    def add(self, token: int) -> tuple[str, str | None]:
        """The text ``token`` releases, and "stop" or "length" if it ends
        the completion."""
        if token in self.eos:
            return self.stops.buf, "stop"
        self.n += 1
        text = self.stops.feed(self.detok.add(token))
        if self.stops.hit:
            return text, "stop"
        if self.n >= self.max_tokens:
            return self.cut(text), "length"
        return text, None

    def cut(self, text: str) -> str:
        """``text`` and what is held back, when the completion ends here."""
        return text + self.stops.buf


def context_hint(n_ctx: int, n_ctx_train: int) -> str:
    """What a user can do about a context overflow."""
    if n_ctx < n_ctx_train:
        return f"raise --ctx / n_ctx, up to the model's {n_ctx_train}"
    return "the model's maximum; shorten the input"


def prompt_ids(model, prompt: Any, add_special: bool = True) -> list[int]:
    """Token ids of a prompt: text, a list of ids, or chat messages."""
    if isinstance(prompt, str):
        return model.tokenize(prompt, add_special)
    if (
        isinstance(prompt, Sequence)
        and prompt
        and all(isinstance(m, dict) for m in prompt)
    ):
        text = model.tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True
        )
        return model.tokenize(text, add_special=False)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ConfigError(
        "prompt must be a string, a list of token ids or a list of messages"
    )


def generate(
    model,
    prompt: Any,
    params: SamplingParams | None = None,
    *,
    add_special: bool = True,
    **changes: Any,
) -> Iterator[GenerationResponse]:
    """Generate a completion of ``prompt``, one response per token.

    Args:
        model: a loaded ``Model``.
        prompt: text, a list of token ids, or chat messages
            (``[{"role": "user", "content": ...}]``, rendered with the model's
            chat template).
        params: how to sample and when to stop (``SamplingParams``; its
            defaults when None).
        add_special: let the tokenizer add BOS to a text prompt.
        changes: ``SamplingParams`` fields that override ``params``
            (``max_tokens=32, temperature=0``).

    Yields:
        ``GenerationResponse`` per token; the last has ``finish_reason`` set.

    The prompt's longest common prefix with what the model's cache holds from
    the previous call is kept, not evaluated again (``Timings.cached_tokens``):
    a chat turn resends the whole conversation.
    """
    p = SamplingParams.make(params, **changes)
    sampler = Sampler(p)
    t0 = time.perf_counter()
    ids = prompt_ids(model, prompt, add_special)
    if not ids:
        raise ConfigError("the prompt is empty (no tokens)")
    n_ctx = model.n_pos  # one sequence's positions (less than n_ctx when shared)
    if len(ids) > n_ctx:
        hint = context_hint(n_ctx, model.spec.n_ctx_train)
        raise ContextOverflowError(
            f"prompt of {len(ids)} tokens is longer than the context of "
            f"{n_ctx} tokens ({hint})"
        )
    # A chat turn resends the conversation: keep the prefix the cache holds.
    if hasattr(model, "reuse_prefix"):
        cached = model.reuse_prefix(ids)
    else:
        cached = 0
        model.reset()
    counter = StepCounter(model) if hasattr(model, "counters") else None
    logits = model.eval(ids[cached:])
    prompt_s = time.perf_counter() - t0
    eos = set(model.tokenizer.eos_ids) | set(model.spec.eos_token_ids)
    done = Completion(model.tokenizer, p, eos)
    history = list(ids)
    ttft = 0.0
    t_decode = time.perf_counter()

    def response(
        text: str, token: int | None, reason: str | None
    ) -> GenerationResponse:
        now = time.perf_counter()
        timings = Timings(
            len(ids) - cached,
            prompt_s,
            done.n,
            now - t_decode if done.n else 0.0,
            ttft,
            cached,
        )
        metrics = counter.step() if counter is not None else None
        return GenerationResponse(text, token, timings, memory_stats(), reason, metrics)

    for _ in range(p.max_tokens):
        token = sampler(logits, history)
        if ttft == 0.0:
            ttft = time.perf_counter() - t0
        history.append(token)
        text, reason = done.add(token)
        if reason is None and model.n_past >= n_ctx:
            text, reason = done.cut(text), "context"
        yield response(text, token, reason)
        if reason is not None:
            return
        logits = model.eval([token])
    yield response("", None, "length")
