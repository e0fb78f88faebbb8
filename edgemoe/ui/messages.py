"""Every message of the chat app. Worker threads reach the UI only through
these (``post_message`` is thread-safe)."""

from __future__ import annotations

from textual.message import Message

from edgemoe.ui.session import CommandResult, TurnResult
from edgemoe.ui.stats import LiveStats


class PromptSubmitted(Message):
    """Enter in the prompt box."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class MetricsUpdate(Message):
    """A step of a reply: the reply so far and the live figures. Each carries
    the whole state, so a pending one is replaced by the next and a slow UI
    skips frames instead of falling behind generation."""

    def __init__(self, turn: int, reply: str, stats: LiveStats) -> None:
        super().__init__()
        self.turn = turn
        self.reply = reply
        self.stats = stats

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MetricsUpdate) and message.turn == self.turn


class TurnFinished(Message):
    def __init__(self, turn: int, result: TurnResult) -> None:
        super().__init__()
        self.turn = turn
        self.result = result


class CommandDone(Message):
    def __init__(self, result: CommandResult) -> None:
        super().__init__()
        self.result = result


class WorkFailed(Message):
    """A reply or command failed; ``error`` is one line for the log. ``fatal``:
    it was a ``FatalChatError``, and the app ends with it."""

    def __init__(self, error: str, fatal: bool = False) -> None:
        super().__init__()
        self.error = error
        self.fatal = fatal
