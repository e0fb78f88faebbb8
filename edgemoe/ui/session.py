"""One chat conversation: history, sampling settings, slash commands and model
reloads. The Textual app and the line REPL both drive it; no Textual here.

Most errors cost one turn or command and the chat goes on; a
``FatalChatError`` ends it (exit status 1): the chat template fails on the
conversation, which every later turn resends, or no model is left loaded.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edgemoe.errors import ConfigError, EdgeMoEError
from edgemoe.sampling_params import SamplingParams
from edgemoe.ui.stats import (
    LiveStats,
    ModelInfo,
    StatsTracker,
    memory_line,
    mib,
    stats_lines,
)

COMMANDS = (
    ("/help", "list commands"),
    ("/stats", "last turn's speed, I/O and memory"),
    ("/reset", "forget the conversation"),
    ("/set KEY VALUE", "temp, top-k, top-p, min-p, n-predict, seed, repeat-penalty,"),
    ("", "repeat-last-n, ignore-eos, system TEXT, budget SIZE|none"),
    ("/set", "show the current settings"),
    ("/quality [Q]", "dual routing: max, high, balanced, fast, min or T1,T2"),
    ("/bye", "quit (also /quit, /exit)"),
)

# /set names (dashes or underscores) -> SamplingParams fields.
_SET_KEYS = {
    "temp": "temperature",
    "temperature": "temperature",
    "top-k": "top_k",
    "top-p": "top_p",
    "min-p": "min_p",
    "n": "max_tokens",
    "n-predict": "max_tokens",
    "max-tokens": "max_tokens",
    "seed": "seed",
    "repeat-penalty": "repeat_penalty",
    "repeat-last-n": "repeat_last_n",
    "ignore-eos": "ignore_eos",
}
_INT_FIELDS = {"top_k", "max_tokens", "repeat_last_n"}
_BOOLS = {"on": True, "true": True, "yes": True, "1": True}
_BOOLS.update({"off": False, "false": False, "no": False, "0": False})


class FatalChatError(ConfigError):
    """The chat cannot go on; the UIs end with it and ``main`` prints it."""


# The next user message when the template is tried on a conversation before it
# is sent: at the start, and before /set system changes it.
_PROBE = {"role": "user", "content": "hello"}


def _chat_sampling(params: SamplingParams) -> SamplingParams:
    """A chat reply of no tokens would look like a hang: refuse it up front."""
    if params.max_tokens < 1:
        raise ConfigError(f"n-predict must be >= 1, got {params.max_tokens}")
    return params


@dataclass(frozen=True)
class CommandResult:
    lines: tuple[str, ...] = ()
    quit: bool = False
    reset: bool = False
    """The history was cleared: the UI clears its pane."""
    model_changed: bool = False
    """Reloaded (budget) or re-tuned (quality): the UI re-reads its ModelInfo."""


@dataclass(frozen=True)
class TurnResult:
    text: str
    finish_reason: str
    """"stop", "length", "context", or "stopped" (the user stopped it)."""
    timings: Any
    stats: LiveStats


class Turn:
    """One user message and its streamed reply. Create it on the UI thread,
    iterate it (on any one thread) for ``GenerationResponse``s; the reply goes
    into the history when iteration ends, early or not."""

    def __init__(self, session: ChatSession, text: str):
        self.session = session
        self.user = text
        self.prompt = [*session.messages(), {"role": "user", "content": text}]
        self.text = ""
        self.finish_reason: str | None = None
        self.tracker: StatsTracker | None = None
        self.final: LiveStats | None = None
        """The figures once iteration ended."""

    def __iter__(self) -> Iterator:
        s = self.session
        with s.lock:
            model = s.require_model()
            try:  # generate() renders it again: a template is cheap next to a turn
                s.render(model, self.prompt)
            except ConfigError as e:
                raise FatalChatError(str(e)) from None
            self.tracker = StatsTracker(model)
            gen = model.generate(self.prompt, s.sampling)
            try:
                for r in gen:
                    self.text += r.text
                    self.tracker.feed(r)
                    self.finish_reason = r.finish_reason
                    yield r
                    if s.stop.is_set() and self.finish_reason is None:
                        self.finish_reason = "stopped"
                        break
            finally:
                gen.close()
                if self.tracker.last is not None:
                    s.history += [
                        {"role": "user", "content": self.user},
                        {"role": "assistant", "content": self.text},
                    ]
                    s.turns += 1
                    s.last = self.final = dataclasses.replace(
                        self.stats(final=True), finish_reason=self.result_reason()
                    )

    def stats(self, final: bool = False) -> LiveStats:
        assert self.tracker is not None, "iterate the turn first"
        return self.tracker.snapshot(final)

    def result_reason(self) -> str:
        # None after the loop: it was left early (Ctrl+C's second interrupt).
        return self.finish_reason or "stopped"

    def result(self) -> TurnResult:
        assert self.tracker is not None and self.final is not None, "iterate first"
        return TurnResult(
            self.text, self.result_reason(), self.tracker.last.timings, self.final
        )


class ChatSession:
    """A loaded model plus the conversation. ``loader(**overrides)`` loads the
    model with the command line's options; a budget
    change reloads through it."""

    def __init__(
        self,
        loader: Callable[..., Any],
        sampling: SamplingParams | None = None,
        system: str | None = None,
    ):
        self.loader = loader
        self.sampling = _chat_sampling(sampling or SamplingParams(max_tokens=512))
        self.system = system or None
        self.history: list[dict[str, str]] = []
        self.turns = 0
        self.stop = threading.Event()
        """Set to end the current reply at the next token."""
        self.lock = threading.Lock()
        self.model = loader()
        self.last: LiveStats | None = None
        """The last finished turn's figures."""
        try:  # a template that fails on the first turn fails before the chat
            self.render(self.model, [*self.messages(), _PROBE])
        except ConfigError as e:
            self.close()
            raise FatalChatError(str(e)) from None

    # -- conversation ------------------------------------------------------------------
    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def turn(self, text: str) -> Turn:
        self.stop.clear()
        return Turn(self, text)

    def require_model(self):
        if self.model is None:
            raise FatalChatError("no model is loaded (a reload failed)")
        return self.model

    @staticmethod
    def render(model, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages``; the template's ConfigError if not."""
        return model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def info(self) -> ModelInfo:
        return ModelInfo.of(self.require_model())

    def idle_stats(self) -> LiveStats:
        """Memory and residency now; only between turns."""
        return StatsTracker(self.require_model()).snapshot(final=True)

    def summary(self) -> str:
        """The exit line: memory breakdown and the process's peak RSS."""
        from edgemoe.runtime.metrics import memory_stats

        mem = memory_stats()
        if self.model is None:
            return f"memory: peak RSS {mib(mem.peak_rss_bytes)}"
        peak = max(mem.peak_rss_bytes, mem.rss_bytes)  # ru_maxrss can lag a page
        return memory_line(self.info(), mem.rss_bytes, peak)

    def close(self) -> None:
        self.stop.set()
        with self.lock:  # a reply still running on a worker ends first
            if self.model is not None:
                self.model.close()
                self.model = None

    # -- slash commands ----------------------------------------------------------------
    def execute(self, line: str) -> CommandResult:
        """Run one ``/command``; bad input raises ConfigError (one line)."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        name = name.lower()
        if name in ("/bye", "/quit", "/exit"):
            return CommandResult(quit=True)
        if name == "/help":
            return CommandResult(tuple(help_lines()))
        if name == "/stats":
            lines = stats_lines(self.last, self.info(), self.turns, self.idle_stats())
            return CommandResult(tuple(lines))
        if name == "/reset":
            self.history.clear()
            self.turns = 0
            return CommandResult(("conversation cleared",), reset=True)
        if name == "/set":
            return self._set(rest)
        if name == "/quality":
            return self._quality(rest)
        raise ConfigError(f"unknown command {name}; /help lists commands")

    def _set(self, rest: str) -> CommandResult:
        if not rest:
            system = repr(self.system) if self.system else "none"
            return CommandResult((self.sampling.describe(), f"system {system}"))
        key, _, value = rest.partition(" ")
        key, value = key.lower().replace("_", "-"), value.strip()
        if key == "system":
            messages = [{"role": "system", "content": value}] if value else []
            messages += [*self.history, _PROBE]
            try:  # refused here, the chat goes on with the old one
                self.render(self.require_model(), messages)
            except FatalChatError:
                raise
            except ConfigError as e:
                raise ConfigError(f"{e}; kept the previous system message") from None
            self.system = value or None
            return CommandResult((f"system message {'set' if value else 'cleared'}",))
        if not value:
            raise ConfigError(f"/set {key} needs a value")
        if key == "budget":
            return self._set_budget(value)
        name = _SET_KEYS.get(key)
        if name is None:
            known = ", ".join([*_SET_KEYS, "system", "budget"])
            raise ConfigError(f"cannot /set {key!r}; known: {known}")
        self.sampling = _chat_sampling(
            dataclasses.replace(self.sampling, **{name: _value(name, key, value)})
        )
        return CommandResult((f"{key} = {value}",))

    def _set_budget(self, value: str) -> CommandResult:
        from edgemoe.runtime.budget import parse_size

        model = self.require_model()
        if model.memory is None:
            raise ConfigError(
                f"{model.path}: a budget applies to converted models (edgemoe convert)"
            )
        budget = None if value.lower() in ("none", "off", "all") else parse_size(value)
        old = model.options.budget
        quality = model.options.quality
        with self.lock:
            # Both copies of the experts never fit a budget: close, then load.
            self.model.close()
            self.model = None
            try:
                self.model = self.loader(budget=budget, quality=quality)
            except EdgeMoEError as e:
                try:
                    self.model = self.loader(budget=old, quality=quality)
                except EdgeMoEError as again:
                    raise FatalChatError(
                        f"{e}; reloading with the previous budget failed too: {again}"
                    ) from None
                raise ConfigError(f"{e}; kept the previous budget") from None
        shown = mib(budget) if budget else "none (all experts resident)"
        return CommandResult((f"reloaded with budget {shown}",), model_changed=True)

    def _quality(self, rest: str) -> CommandResult:
        model = self.require_model()
        if rest:
            model.set_quality(rest)  # a preset or "T1,T2"
            return CommandResult((f"quality = {rest}",), model_changed=True)
        return CommandResult((f"quality {model.options.quality}",))


def _value(name: str, key: str, text: str) -> Any:
    """Parse ``/set KEY TEXT`` for SamplingParams field ``name``."""
    if name == "seed" and text.lower() in ("random", "none", "-1"):
        return None
    if name == "ignore_eos":
        if text.lower() not in _BOOLS:
            raise ConfigError(f"ignore-eos takes on or off, got {text!r}")
        return _BOOLS[text.lower()]
    kind = int if name in _INT_FIELDS or name == "seed" else float
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key} must be {what}, got {text!r}") from None


def help_lines(keys: tuple[tuple[str, str], ...] = ()) -> list[str]:
    rows = [*COMMANDS, *keys]
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]
