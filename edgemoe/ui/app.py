"""``edgemoe chat``'s full-screen app: chat pane and prompt on the left, memory
and latency panels on the right (below ``NARROW`` columns they fold into one
line; F2 shows them instead of the chat). Replies and commands run on worker
threads that report back only through messages."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Footer, Header, Static

from edgemoe.errors import EdgeMoEError
from edgemoe.ui.messages import (
    CommandDone,
    MetricsUpdate,
    PromptSubmitted,
    TurnFinished,
    WorkFailed,
)
from edgemoe.ui.session import COMMANDS, ChatSession, FatalChatError, Turn
from edgemoe.ui.stats import LiveStats
from edgemoe.ui.widgets import (
    KEYS,
    Body,
    ChatPane,
    HelpScreen,
    LatencyPanel,
    MemoryPanel,
    PromptInput,
    StatsStrip,
)


class ChatApp(App[int]):
    """A chat over one ``ChatSession``; ``run()`` returns the exit status."""

    # Absolute: Textual resolves a relative path against a subclass's file.
    CSS_PATH = Path(__file__).with_name("app.tcss")
    TITLE = "EdgeMoE chat"
    BINDINGS = [
        Binding("ctrl+c", "stop", "Stop reply", priority=True),
        Binding("f1", "help", "Help"),
        Binding("f2", "panels", "Panels"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, session: ChatSession) -> None:
        super().__init__()
        self.session = session
        self.busy = False
        """A reply or command is running; new input waits for it."""
        self.turn_id = 0
        self.reply: Static | None = None
        self.last_finish: str | None = None
        """How the last reply ended ("stop", "length", "context", "stopped")."""
        self.info = session.info()
        """The model's facts, re-read when a command reloads or re-tunes it."""
        self.speed = LiveStats()
        """The figures the latency panel shows (the strip repeats them)."""
        self.fatal: str | None = None
        """The error that ended the app (``run_app`` raises it once it is gone)."""

    def compose(self) -> ComposeResult:
        yield Header()
        with Body(id="body"):
            with Vertical(id="main"):
                yield ChatPane(id="chat")
                yield StatsStrip(id="strip")
                yield PromptInput(
                    id="prompt",
                    soft_wrap=True,
                    show_line_numbers=False,
                    placeholder="Message (Enter sends, Ctrl+J new line, /help)",
                )
            # Only the memory map scrolls: the latency panel and its
            # sparkline stay whole below it.
            with Vertical(id="side"):
                with VerticalScroll(id="memory-box"):
                    yield MemoryPanel(id="memory")
                yield LatencyPanel(id="latency")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.info.path
        self.query_one("#memory-box").border_title = "Memory"
        self.query_one("#latency").border_title = "Latency"
        self.show_stats(self.session.idle_stats())
        self.chat.add("/help lists commands · F1 or ? shows keys", "info")
        self.query_one(PromptInput).focus()

    @property
    def chat(self) -> ChatPane:
        return self.query_one(ChatPane)

    def show_stats(self, live: LiveStats, latency: bool = True) -> None:
        """Refresh the panels; ``latency=False`` keeps the last turn's figures
        (after a reload only memory changed)."""
        if latency:
            self.speed = live
            self.query_one(LatencyPanel).show(self.info, live)
        self.query_one(MemoryPanel).show(self.info, live)
        self.query_one(StatsStrip).show(self.info, live, self.speed)

    # -- input -------------------------------------------------------------------------
    def on_prompt_submitted(self, message: PromptSubmitted) -> None:
        text = message.text.strip()
        if not text:
            return
        if text == "?":
            self.action_help()
            return
        if self.busy:
            self.chat.add("busy: wait for the reply, or Ctrl+C to stop it", "error")
            return
        self.busy = True
        if text.startswith("/"):
            self.chat.add(text, "command")
            self.run_command(text)
            return
        self.chat.add(text, "user")
        self.reply = self.chat.add("", "assistant")
        self.turn_id += 1
        self.generate(self.session.turn(text), self.turn_id)

    def action_stop(self) -> None:
        if self.busy:
            self.session.stop.set()
        else:
            self.notify("nothing to stop; Ctrl+Q quits", timeout=2)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen([*COMMANDS, *KEYS]))

    def action_panels(self) -> None:
        """Wide: hide or show the side column. Narrow: the panels in place of
        the chat, or back."""
        body = self.query_one(Body)
        body.toggle_class("flipped")
        if body.has_class("narrow") and not body.has_class("flipped"):
            self.query_one(PromptInput).focus()

    async def action_quit(self) -> None:
        self.session.stop.set()  # a running reply ends at its next token
        self.exit(0)

    # -- workers (threads; they only post messages) ------------------------------------
    @work(thread=True, group="model", exit_on_error=False)
    def generate(self, turn: Turn, turn_id: int) -> None:
        try:
            for _ in turn:
                self.post_message(MetricsUpdate(turn_id, turn.text, turn.stats()))
            self.post_message(TurnFinished(turn_id, turn.result()))
        except FatalChatError as e:
            self.post_message(WorkFailed(str(e), fatal=True))
        except EdgeMoEError as e:
            self.post_message(WorkFailed(str(e)))
        except Exception as e:  # never a traceback over the chat
            self.post_message(WorkFailed(f"internal error: {type(e).__name__}: {e}"))

    @work(thread=True, group="model", exit_on_error=False)
    def run_command(self, line: str) -> None:
        try:
            self.post_message(CommandDone(self.session.execute(line)))
        except FatalChatError as e:
            self.post_message(WorkFailed(str(e), fatal=True))
        except EdgeMoEError as e:
            self.post_message(WorkFailed(str(e)))
        except Exception as e:
            self.post_message(WorkFailed(f"internal error: {type(e).__name__}: {e}"))

    # -- worker results ----------------------------------------------------------------
    def on_metrics_update(self, message: MetricsUpdate) -> None:
        if message.turn != self.turn_id or self.reply is None:
            return
        self.reply.update(Text(message.reply))  # model text is never markup
        self.show_stats(message.stats)

    def on_turn_finished(self, message: TurnFinished) -> None:
        from edgemoe.report import stats_line

        r = message.result
        if self.reply is not None:
            self.reply.update(Text(r.text))
        if r.finish_reason == "stopped":
            self.chat.add("[ stopped ]", "info")
        elif r.finish_reason == "context":
            self.chat.add("[ context full: /reset starts over ]", "info")
        self.chat.add(stats_line(r.timings), "stats")
        self.show_stats(r.stats)
        self.last_finish = r.finish_reason
        self.reply = None
        self.busy = False

    def on_command_done(self, message: CommandDone) -> None:
        r = message.result
        self.busy = False
        if r.quit:
            self.exit(0)
            return
        if r.reset:
            self.chat.clear()
        for line in r.lines:
            self.chat.add(line, "info")
        if r.model_changed:
            self.info = self.session.info()
            self.sub_title = self.info.path
            self.show_stats(self.session.idle_stats(), latency=False)

    def on_work_failed(self, message: WorkFailed) -> None:
        if message.fatal:  # printed on the terminal once the screen is restored
            self.fatal = message.error
            self.exit(1)
            return
        if self.reply is not None and not str(self.reply.content):
            self.reply.remove()
        self.reply = None
        self.chat.add(f"error: {message.error}", "error")
        self.busy = False
        if self.session.model is not None:  # a failed reload restored it
            self.info = self.session.info()
            self.show_stats(self.session.idle_stats(), latency=False)


def run_app(session: ChatSession) -> int:
    """The exit status of a chat that ended normally; raises ``FatalChatError``."""
    app = ChatApp(session)
    status = app.run() or 0
    if app.fatal is not None:
        raise FatalChatError(app.fatal)
    return status
