"""Continuous batching: several requests decode together through one model.

A thread runs steps. Each step is one ``Model.decode`` over the running
requests: one token for each that is generating, and a chunk of the prompt of
each that is still reading it (at most ``n_batch`` tokens in all, so a long
prompt does not stall the others for long). Requests join between steps, into
one of ``parallel`` slots of ``n_ctx // parallel`` cells of the shared KV
cache; the rest wait in a bounded queue. Every request has its own sampler,
stop strings and quality (dual routing), and all share the expert cache.

Nothing here knows HTTP: ``submit`` takes a ``Request`` and a callable that
receives the request's ``Event``s on the scheduler's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgemoe.errors import ConfigError, ContextOverflowError, EdgeMoEError
from edgemoe.runtime import token_ids
from edgemoe.runtime.engine import Completion
from edgemoe.runtime.sampling import Sampler
from edgemoe.sampling_params import SamplingParams


class QueueFull(EdgeMoEError):
    """Every slot is busy and the queue is at its limit: try again later."""


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    """Token ids (the chat template already applied)."""
    params: SamplingParams = SamplingParams()
    quality: str | None = None
    """Dual routing for this request (a preset or "T1,T2"); None: the model's."""


@dataclass(frozen=True)
class Event:
    """A piece of one request's output; the last has ``finish_reason``."""

    text: str
    token: int | None
    finish_reason: str | None = None
    """"stop", "length", "context" or "error" on the last event."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens an earlier request's sequence already held (not evaluated)."""


@dataclass
class Totals:
    """What the server reports at /metrics (read from any thread)."""

    requests: dict[str, int] = field(default_factory=dict)
    """Finished requests by finish reason ("cancelled" included)."""
    prompt_tokens: int = 0
    """Evaluated; ``cached_tokens`` were reused instead."""
    cached_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    step_s: float = 0.0
    counters: dict = field(default_factory=dict)
    """``Model.counters()`` after the latest step."""


@dataclass(eq=False)
class _Job:
    request: Request
    emit: Callable[[Event], None]
    sampler: Sampler
    text: Completion
    t0: float = field(default_factory=time.perf_counter)
    seq: int | None = None
    fed: int = 0
    """Prompt tokens in the cache so far (reused ones first)."""
    cached: int = 0
    history: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    cancelled: bool = False

    @property
    def reading(self) -> bool:
        return self.fed < len(self.request.prompt)


class Handle:
    """A submitted request: ``cancel()`` frees its slot at the next step."""

    def __init__(self, scheduler: Scheduler, job: _Job):
        self._scheduler, self._job = scheduler, job

    def cancel(self) -> None:
        self._scheduler._cancel(self._job)


class Scheduler:
    def __init__(
        self,
        model,
        parallel: int = 4,
        queue_limit: int = 64,
        n_batch: int | None = None,
        thread: bool = True,
    ):
        if parallel < 1:
            raise ConfigError(f"parallel must be >= 1, got {parallel}")
        if model.n_ctx < parallel:
            raise ConfigError(
                f"a context of {model.n_ctx} tokens cannot hold {parallel} slots"
            )
        self.model = model
        self.parallel = parallel
        self.slot_ctx = min(model.n_ctx // parallel, model.n_pos)
        """KV cells a request may fill: its prompt and what it generates."""
        self.queue_limit = queue_limit
        self.n_batch = n_batch or model.options.n_batch
        self.totals = Totals()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._idle: dict[int, None] = {}
        """Finished requests' sequences, oldest first, kept while their cells
        are not needed: a request that starts with one's tokens (a chat
        resending its conversation) reuses them, as llama-server's slots do."""
        self._lock = threading.Condition()
        self._closed = False
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="edgemoe-scheduler")
            self._thread.daemon = True
            self._thread.start()

    # -- any thread ------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Requests decoding now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def check(self, request: Request) -> None:
        """Raise ConfigError/ContextOverflowError for a request that can never
        run, before it is queued (the server answers 400)."""
        n, p = len(request.prompt), request.params
        if n == 0:
            raise ConfigError("the prompt is empty (no tokens)")
        if n >= self.slot_ctx:
            raise ContextOverflowError(
                f"the prompt has {n} tokens; a request's context is {self.slot_ctx} "
                f"tokens (the server's {self.model.n_ctx} over {self.parallel} slots)"
            )
        if n + p.max_tokens > self.slot_ctx:
            raise ContextOverflowError(
                f"max_tokens {p.max_tokens} and the prompt's {n} tokens exceed a "
                f"request's context of {self.slot_ctx} tokens"
            )
        spec = self.model.spec  # the ids, as Model.decode checks them
        ids = token_ids.as_ids(request.prompt, spec.n_vocab)
        token_ids.check(ids, 0, spec.n_vocab, self.slot_ctx, spec.n_ctx_train)
        if request.quality is not None:
            routed = self.model.routed
            if routed is None:
                raise ConfigError(
                    "quality applies to converted models; this one is not"
                )
            routed.policy_for(request.quality, self.model.levels)

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Handle:
        """Queue ``request``; ``emit`` gets its events on the scheduler's
        thread (it must not block). Raises QueueFull, or what ``check`` does."""
        self.check(request)
        m = self.model
        job = _Job(
            request,
            emit,
            Sampler(request.params),
            Completion(m.tokenizer, request.params, self._eos()),
        )
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            busy = len(self._running) + len(self._waiting)
            if busy >= self.parallel + self.queue_limit:
                raise QueueFull(
                    f"{len(self._running)} requests running and {len(self._waiting)} "
                    "queued"
                )
            self._waiting.append(job)
            self._lock.notify()
        return Handle(self, job)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _cancel(self, job: _Job) -> None:
        with self._lock:
            job.cancelled = True
            self._lock.notify()

    def _eos(self) -> frozenset[int]:
        m = self.model
        return frozenset(m.tokenizer.eos_ids) | frozenset(m.spec.eos_token_ids)

    # -- the scheduler's thread --------------------------------------------------------
    def run(self) -> None:
        """The step loop, until ``close``; a thread of its own unless the
        scheduler was made with ``thread=False``, for the caller to run it
        on the main thread: ggml's OpenMP workers spin between graphs only
        for the main thread's team on a machine with no spare core (libgomp
        throttles the others), so decode is faster there on two cores."""
        while True:
            with self._lock:
                while not self._closed and not self._running and not self._waiting:
                    self._lock.wait()
                if self._closed:
                    break
                for job in [j for j in self._waiting if j.cancelled]:
                    self._waiting.remove(job)
                    self._count("cancelled")
                for job in [j for j in self._running if j.cancelled]:
                    self._finish(job, None, "cancelled")
                while self._waiting and len(self._running) < self.parallel:
                    job = self._waiting.popleft()
                    self._admit(job)
                    self._running.append(job)
                jobs = self._pick()
            if jobs:
                self._step(jobs)
        for job in [*self._running, *self._waiting]:
            self._finish(job, Event("", None, "error", error="server shut down"))
        while self._idle:
            self._drop_oldest_idle()

    def _admit(self, job: _Job) -> None:
        """A sequence for ``job``: the idle one sharing the longest prefix
        with its prompt, cut to that prefix, else a new one."""
        m, prompt = self.model, job.request.prompt
        best, n = None, 0
        for seq in self._idle:
            k = m.common_prefix(prompt, seq)
            if k > n:
                best, n = seq, k
        if best is None:
            job.seq = m.new_sequence()
            return
        del self._idle[best]
        job.seq = best
        job.fed = job.cached = m.reuse_prefix(prompt, best)
        self.totals.cached_tokens += job.cached

    def _make_room(self, n_new: int) -> None:
        """Free idle sequences, oldest first, until ``n_new`` cells are free."""
        while self._idle and self.model.cache.n_free < n_new:
            self._drop_oldest_idle()

    def _drop_oldest_idle(self) -> None:
        seq = next(iter(self._idle))
        del self._idle[seq]
        self.model.free_sequence(seq)

    def _pick(self) -> list[_Job]:
        """This step's requests: every running one, whatever its quality
        (``Model.decode`` routes each sequence with its own)."""
        return list(self._running)

    def _step(self, jobs: list[_Job]) -> None:
        m = self.model
        room = max(self.n_batch - sum(not j.reading for j in jobs), 1)
        batch = []
        for j in jobs:
            if j.reading:
                take = min(len(j.request.prompt) - j.fed, room)
                if take <= 0:
                    continue
                room -= take
                batch.append((j, list(j.request.prompt[j.fed : j.fed + take])))
            else:
                batch.append((j, [j.history[-1]]))
        self._make_room(sum(len(toks) for _, toks in batch))
        t0 = time.perf_counter()
        try:
            qualities = [j.request.quality for j, _ in batch] if m.routed else None
            logits = m.decode([(j.seq, toks) for j, toks in batch], qualities)
        except Exception as e:  # the step's requests fail; the server goes on
            msg = str(e) if isinstance(e, EdgeMoEError) else "internal error"
            if not isinstance(e, EdgeMoEError):
                import traceback

                traceback.print_exc()  # the operator's log, never the client's
            for j, _ in batch:
                self._finish(j, Event("", None, "error", error=msg))
            return
        dt = time.perf_counter() - t0
        totals = self.totals
        totals.steps += 1
        totals.step_s += dt
        totals.counters = m.counters()
        for (j, toks), row in zip(batch, logits):
            if j.reading:
                j.fed += len(toks)
                totals.prompt_tokens += len(toks)
                if j.reading:
                    continue
                j.history = list(j.request.prompt)
            try:
                self._sample(j, row)
            except EdgeMoEError as e:  # NaN logits: this request ends, not the server
                self._finish(j, Event("", None, "error", error=str(e)))

    def _sample(self, j: _Job, logits) -> None:
        if j.request.params.max_tokens == 0:
            self._finish(j, self._event(j, "", None, "length"))
            return
        token = j.sampler(logits, j.history)
        if not j.ttft_s:
            j.ttft_s = time.perf_counter() - j.t0
        j.history.append(token)
        n = j.text.n
        text, reason = j.text.add(token)
        self.totals.generated_tokens += j.text.n - n
        if reason is None and len(j.history) >= self.slot_ctx:
            text, reason = j.text.cut(text), "context"
        if reason is None:
            _send(j, self._event(j, text, token, None))
        else:
            self._finish(j, self._event(j, text, token, reason))

    def _event(self, j: _Job, text: str, token, reason) -> Event:
        n = len(j.request.prompt)
        return Event(text, token, reason, n, j.text.n, j.ttft_s, None, j.cached)

    def _finish(self, j: _Job, last: Event | None, reason: str | None = None) -> None:
        if j.seq is not None:
            done = last is not None and last.finish_reason in (
                "stop",
                "length",
                "context",
            )
            if done:
                self._idle[j.seq] = None  # its cells stay until a step needs them
                while len(self._idle) > self.parallel:
                    self._drop_oldest_idle()
            else:
                self.model.free_sequence(j.seq)
            j.seq = None
        if j in self._running:
            self._running.remove(j)
        self._count(reason or (last.finish_reason if last else "cancelled"))
        if last is not None:
            _send(j, last)

    def _count(self, reason: str) -> None:
        self.totals.requests[reason] = self.totals.requests.get(reason, 0) + 1


def _send(j: _Job, event: Event) -> None:
    """A consumer's failure (its client went away) costs that request only."""
    try:
        j.emit(event)
    except Exception:
        j.cancelled = True
