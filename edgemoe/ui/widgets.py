"""The chat app's widgets: prompt box, chat pane, memory and latency panels,
key help. They render ``ModelInfo``/``LiveStats``; they never touch a model."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Sparkline, Static, TextArea

from edgemoe.ui.messages import PromptSubmitted
from edgemoe.ui.stats import LiveStats, ModelInfo, hits_text, mib

GLYPHS = "▁▂▃▄▅▆▇█"
LEVEL_STYLES = ("green", "yellow", "magenta", "cyan", "red", "blue")
BAR_WIDTH = 36
MAP_WIDTH = 32
"""Experts per row of the residency map; wider layers wrap."""

KEYS = (
    ("Enter", "send"),
    ("Ctrl+J, Shift+Enter", "new line"),
    ("Ctrl+C", "stop the reply"),
    ("F1, ?", "this help"),
    ("Ctrl+Q", "quit"),
)


class PromptInput(TextArea):
    """Enter sends; Ctrl+J (or Shift+Enter where the terminal reports it)
    inserts a newline."""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(PromptSubmitted(self.text))
            self.clear()
        elif event.key in ("ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")


class ChatPane(VerticalScroll):
    """The conversation: one Static per user message, reply, note or error."""

    def on_mount(self) -> None:
        self.anchor()

    def add(self, text: str, kind: str) -> Static:
        line = Static(Text(text), classes=kind)
        self.mount(line)
        return line

    def transcript(self) -> str:
        """The pane's text as shown (tests read it)."""
        return "\n".join(str(s.content) for s in self.query(Static))

    def clear(self) -> None:
        self.remove_children()


def level_glyphs(levels: tuple[int, ...]) -> dict[int, Text]:
    """A taller, coloured glyph per higher level; ``·`` for not resident."""
    n = len(levels)
    out = {0: Text("·", style="dim")}
    for i, lv in enumerate(levels):
        g = GLYPHS[round((i + 1) / n * (len(GLYPHS) - 1))]
        out[lv] = Text(g, style=LEVEL_STYLES[i % len(LEVEL_STYLES)])
    return out


class MemoryPanel(Static):
    """Budget bar (backbone / KV / scratch / experts by level / free), RSS, and
    which experts are resident at which level, one row per MoE layer."""

    def show(self, info: ModelInfo, live: LiveStats) -> None:
        self.update(memory_text(info, live))


def memory_text(info: ModelInfo, live: LiveStats) -> Text:
    t = Text()
    rss = f"RSS {mib(live.rss_bytes)} · peak {mib(live.peak_rss_bytes)}\n"
    p = info.plan
    if p is None:
        t.append(rss)
        t.append(f"weights {mib(info.weight_bytes)} · KV cache {mib(info.kv_bytes)}\n")
        t.append("experts: all resident (plain model, no streaming)", style="dim")
        return t
    styles = {
        lv: LEVEL_STYLES[i % len(LEVEL_STYLES)] for i, lv in enumerate(info.levels)
    }
    parts = [
        ("backbone", p.backbone, "blue"),
        ("KV", p.kv_cache, "cyan"),
        ("scratch", p.scratch + p.runtime, "grey50"),
    ]
    parts += [
        (f"L{lv}", live.resident_bytes.get(lv, 0), styles[lv]) for lv in info.levels
    ]
    total = p.budget or p.total
    free = max(total - sum(b for _, b, _ in parts), 0)
    budget = mib(p.budget) if p.budget else "none (all resident)"
    t.append(f"budget {budget} · quality {info.quality}\n")
    cells = 0
    for _, b, style in parts:
        n = round(b / total * BAR_WIDTH) if total else 0
        t.append("█" * n, style=style)
        cells += n
    t.append("░" * max(BAR_WIDTH - cells, 0) + "\n", style="dim")
    fixed, experts = parts[:3], [*parts[3:], ("free", free, "dim")]
    for row in (fixed, experts):
        for i, (name, b, style) in enumerate(row):
            t.append(("" if i == 0 else " · ") + name, style=style)
            t.append(f" {b / 2**20:.1f}")
        t.append(" MiB\n")
    t.append(rss)
    glyphs = level_glyphs(info.levels)
    t.append("resident experts ")
    for lv in info.levels:
        t.append_text(glyphs[lv])
        t.append(f"L{lv} ")
    t.append("· out\n")
    for layer, row in live.residency:
        for start in range(0, len(row), MAP_WIDTH):
            t.append(f"{layer:>3} " if start == 0 else "    ", style="dim")
            for lv in row[start : start + MAP_WIDTH]:
                t.append_text(glyphs.get(lv, glyphs[0]))
            t.append("\n")
    t.rstrip()
    return t


class LatencyPanel(Vertical):
    """TTFT, prompt/generation t/s, per-token latency sparkline, I/O stall,
    cache hits by level, MiB read per token."""

    def compose(self) -> ComposeResult:
        yield Static(id="latency-text")
        yield Sparkline([], id="latency-spark")

    def show(self, info: ModelInfo, live: LiveStats) -> None:
        self.query_one("#latency-text", Static).update(latency_text(info, live))
        self.query_one("#latency-spark", Sparkline).data = list(live.token_ms)

    @property
    def text(self) -> str:
        return str(self.query_one("#latency-text", Static).content)


def latency_text(info: ModelInfo, live: LiveStats) -> Text:
    last = f"{live.token_ms[-1]:.1f} ms" if live.token_ms else "-"
    return Text(
        f"TTFT        {live.ttft_s * 1e3:.0f} ms\n"
        f"prompt      {live.prompt_tps:.1f} t/s ({live.prompt_tokens} tokens"
        + (f", {live.cached_tokens} cached" if live.cached_tokens else "")
        + ")\n"
        f"generation  {live.generation_tps:.1f} t/s ({live.generation_tokens} tokens)\n"
        f"I/O stall   {live.stall_fraction:.0%}\n"
        f"hits        {hits_text(live, info)}\n"
        f"read        {live.read_per_token / 2**20:.2f} MiB/token\n"
        f"per token   {last} · the last {len(live.token_ms)} below"
    )


class HelpScreen(ModalScreen[None]):
    """Keys and slash commands; any of Escape, F1, q or ? closes it."""

    BINDINGS = [
        Binding("escape,f1,q,question_mark", "dismiss", "Close"),
    ]

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def compose(self) -> ComposeResult:
        yield Static(Text("\n".join(self.lines)), id="help")
