"""The chat app's widgets: prompt box, chat pane, memory and latency panels,
the one-line stats strip, key help. They render ``ModelInfo``/``LiveStats``;
they never touch a model.

Panel text is laid out for the widget's own width (``pack``) and again on
every resize, so a line never wraps mid-figure ("MiB" alone on a line) and
never runs past its border."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from textwrap import wrap as _wrap

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Sparkline, Static, TextArea

from edgemoe.ui.messages import PromptSubmitted
from edgemoe.ui.stats import LiveStats, ModelInfo, hits_text, mib

GLYPHS = "▁▂▃▄▅▆▇█"
LEVEL_STYLES = ("green", "yellow", "magenta", "cyan", "red", "blue")
BAR_WIDTH = 36
PANEL_WIDTH = 44
"""A side panel's text width (the side column is 48), until laid out."""
NARROW = 110
"""Below this many columns the side panels collapse to one line: the chat
keeps >= 60 columns beside a 48-column side column only from here."""
LABEL = 12
"""Latency rows: label column, and the indent of a row's continuation."""

KEYS = (
    ("Enter", "send"),
    ("Ctrl+J, Shift+Enter", "new line"),
    ("Ctrl+C", "stop the reply"),
    ("F1, ?", "this help"),
    ("F2", "show or hide the memory and latency panels"),
    ("Ctrl+Q", "quit"),
)
CLOSE_HELP = "Esc, F1, q or ? closes this help"


def pack(
    parts: Iterable[str | Text], width: int, sep: str = " · ", indent: int = 0
) -> list[Text]:
    """``parts`` joined by ``sep`` into lines of at most ``width`` cells,
    breaking only between parts; a part wider than a line is cut with "…".

    Returns:
        The lines, as ``Text`` (styles of the parts kept).
    """
    lines: list[Text] = []
    for part in parts:
        part = Text(part) if isinstance(part, str) else part
        if lines and lines[-1].cell_len + len(sep) + part.cell_len <= width:
            lines[-1].append(sep)
            lines[-1].append_text(part)
            continue
        line = Text(" " * indent if lines else "")
        line.append_text(part)
        line.truncate(max(width, 1), overflow="ellipsis")
        lines.append(line)
    return lines


# Whole words: "repeat-penalty" split at its dash reads as two settings.
wrap = partial(_wrap, break_on_hyphens=False)


def join(lines: Iterable[Text]) -> Text:
    return Text("\n").join(lines)


class Fitted(Static):
    """A Static whose text is laid out by ``fit`` for its content width, and
    again whenever that width changes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.args: tuple | None = None
        self.text_width = PANEL_WIDTH

    def show(self, *args) -> None:
        self.args = args
        self.refit()

    def on_resize(self, event: events.Resize) -> None:
        # Not self.size: that is 0 while hidden, and Textual sends Resize only
        # when the laid-out size differs from the last one it sent.
        self.text_width = max(event.size.width - self.styles.gutter.width, 1)
        self.refit()

    def refit(self) -> None:
        if self.args is not None:
            self.update(self.fit(self.text_width, *self.args))

    def fit(self, width: int, *args) -> Text:
        raise NotImplementedError


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


class Body(Horizontal):
    """Chat beside the panels; ``narrow`` below ``NARROW`` columns, where
    the CSS folds the panels into the strip."""

    def on_resize(self, event: events.Resize) -> None:
        # The body's own width is the terminal's, whichever screen is on top.
        narrow = event.size.width < NARROW
        if narrow != self.has_class("narrow"):
            self.set_class(narrow, "narrow")
            # F2 flips the other layout differently: start over at the chat.
            if self.has_class("flipped"):
                self.remove_class("flipped")
                self.screen.query_one(PromptInput).focus()


def level_glyphs(levels: tuple[int, ...]) -> dict[int, Text]:
    """A taller, coloured glyph per higher level; ``·`` for not resident."""
    n = len(levels)
    out = {0: Text("·", style="dim")}
    for i, lv in enumerate(levels):
        g = GLYPHS[round((i + 1) / n * (len(GLYPHS) - 1))]
        out[lv] = Text(g, style=LEVEL_STYLES[i % len(LEVEL_STYLES)])
    return out


class MemoryPanel(Fitted):
    """Budget bar (backbone / KV / scratch / experts by level / free), RSS, and
    which experts are resident at which level, one row per MoE layer."""

    def fit(self, width: int, info: ModelInfo, live: LiveStats) -> Text:
        return memory_text(info, live, width)


def memory_text(info: ModelInfo, live: LiveStats, width: int = PANEL_WIDTH) -> Text:
    rss = pack(
        [f"RSS {mib(live.rss_bytes)}", f"peak {mib(live.peak_rss_bytes)}"], width
    )
    p = info.plan
    if p is None:
        sizes = [f"weights {mib(info.weight_bytes)}", f"KV cache {mib(info.kv_bytes)}"]
        note = [
            Text("experts: all resident", "dim"),
            Text("(plain model, no streaming)", "dim"),
        ]
        return join([*rss, *pack(sizes, width), *pack(note, width, sep=" ")])
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
    lines = pack([f"budget {budget}", f"quality {info.quality}"], width)
    bar, cells = Text(), min(BAR_WIDTH, width)
    for _, b, style in parts:
        n = min(round(b / total * cells) if total else 0, cells - bar.cell_len)
        bar.append("█" * n, style=style)
    bar.append("░" * (cells - bar.cell_len), style="dim")
    lines.append(bar)
    # GiB past 1 GiB keeps a row of four figures within a side panel; each
    # line ends in its unit, so a row that breaks never strands "MiB".
    if total >= 2**30:
        unit, scale, digits = " GiB", 2**30, 2
    else:
        unit, scale, digits = " MiB", 2**20, 1
    fixed, experts = parts[:3], [*parts[3:], ("free", free, "dim")]
    for row in (fixed, experts):
        figures = [
            Text.assemble((n, style), f" {b / scale:,.{digits}f}")
            for n, b, style in row
        ]
        for line in pack(figures, width - len(unit)):
            lines.append(line + Text(unit))
    lines += rss
    glyphs = level_glyphs(info.levels)
    legend = [Text.assemble(glyphs[lv], f"L{lv}") for lv in info.levels]
    lines += pack(["resident experts", *legend, "· out"], width, sep=" ")
    # A power of two per row, so a layer's rows line up in whole blocks.
    per_row = next((n for n in (64, 32, 16) if n <= width - 4), 8)
    for layer, row in live.residency:
        for start in range(0, len(row), per_row):
            line = Text(f"{layer:>3} " if start == 0 else "    ", style="dim")
            for lv in row[start : start + per_row]:
                line.append_text(glyphs.get(lv, glyphs[0]))
            lines.append(line)
    return join(lines)


class LatencyText(Fitted):
    def fit(self, width: int, info: ModelInfo, live: LiveStats) -> Text:
        return latency_text(info, live, width)


class LatencyPanel(Vertical):
    """TTFT, prompt/generation t/s, per-token latency sparkline, I/O stall,
    cache hits by level, MiB read per token."""

    def compose(self) -> ComposeResult:
        yield LatencyText(id="latency-text")
        yield Sparkline([], id="latency-spark")

    def show(self, info: ModelInfo, live: LiveStats) -> None:
        self.query_one(LatencyText).show(info, live)
        self.query_one("#latency-spark", Sparkline).data = list(live.token_ms)

    @property
    def text(self) -> str:
        return str(self.query_one(LatencyText).content)


def latency_text(info: ModelInfo, live: LiveStats, width: int = PANEL_WIDTH) -> Text:
    last = f"{live.token_ms[-1]:.1f} ms" if live.token_ms else "-"
    cached = f", {live.cached_tokens} cached" if live.cached_tokens else ""
    # One part per level, so a long list breaks between levels.
    if info.converted and live.hit_rate:
        hits = [f"L{lv} {rate:.0%}" for lv, rate in live.hit_rate.items()]
    else:
        hits = [hits_text(live, info)]
    rows = [
        ("TTFT", [f"{live.ttft_s * 1e3:.0f} ms"]),
        (
            "prompt",
            [f"{live.prompt_tps:.1f} t/s", f"({live.prompt_tokens} tokens{cached})"],
        ),
        (
            "generation",
            [f"{live.generation_tps:.1f} t/s", f"({live.generation_tokens} tokens)"],
        ),
        ("I/O stall", [f"{live.stall_fraction:.0%}"]),
        ("hits", hits),
        ("read", [f"{live.read_per_token / 2**20:.2f} MiB/token"]),
        ("per token", [last, f"· the last {len(live.token_ms)} below"]),
    ]
    lines = []
    for label, (first, *rest) in rows:
        lines += pack([f"{label:<{LABEL}}{first}", *rest], width, " ", LABEL)
    return join(lines)


class StatsStrip(Fitted):
    """The panels' headline figures on one line, shown where the panels are
    folded away (narrow terminals, or hidden with F2)."""

    HINT = "F2 panels"

    def fit(self, width: int, info: ModelInfo, live: LiveStats, speed: LiveStats):
        parts = [f"RSS {mib(live.rss_bytes)}"]
        if info.plan is not None and info.plan.budget:
            parts.append(f"budget {mib(info.plan.budget)}")
        parts += [
            f"{speed.generation_tps:.1f} t/s",
            f"stall {speed.stall_fraction:.0%}",
            f"hits {hits_text(speed, info)}" if info.converted else "",
        ]
        room = width - len(self.HINT) - 3
        line = pack([p for p in parts if p], room)[0] if room > 0 else Text()
        line.stylize("dim")
        return line + Text(" · " + self.HINT if line else self.HINT)


class HelpScreen(ModalScreen[None]):
    """Commands and keys, wrapped to the screen; any of Escape, F1, q or ?
    closes it (its last line says so)."""

    BINDINGS = [
        Binding("escape,f1,q,question_mark", "dismiss", "Close"),
    ]

    def __init__(self, rows: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self.rows: list[tuple[str, str]] = []
        for key, what in rows:  # a "" key continues the row above
            if key or not self.rows:
                self.rows.append((key, what))
            else:
                self.rows[-1] = (self.rows[-1][0], f"{self.rows[-1][1]} {what}")

    def compose(self) -> ComposeResult:
        box = Static(id="help")
        box.border_title = "Help"
        box.border_subtitle = "Esc closes"
        yield box

    def on_mount(self) -> None:
        self.relayout(self.app.size.width)

    def on_resize(self, event: events.Resize) -> None:
        self.relayout(event.size.width)

    def relayout(self, screen_width: int) -> None:
        # Border and padding take 4 columns; past 80 a line is hard to read.
        width = max(min(screen_width - 4, 80), 20)
        key_w = max(len(k) for k, _ in self.rows) + 2
        lines = []
        for key, what in self.rows:
            body = wrap(what, max(width - key_w, 10)) or [""]
            lines.append(f"{key:<{key_w}}{body[0]}")
            lines += [" " * key_w + b for b in body[1:]]
        lines += ["", *wrap(CLOSE_HELP, width)]
        self.query_one("#help", Static).update(Text("\n".join(lines)))
