"""``edgemoe chat``'s layout, driven by the pilot at 80×24, 120×40, 160×45 and
200×60 on the converted fixture, then with a large model's figures: every
widget inside the screen and its parent, a usable chat pane, panel text that
fits its widget (no wrapped "MiB"), the sparkline whole, and help that says
which keys close it. Regions, not snapshots: colours and glyph details may
change freely."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from functools import partial
from types import SimpleNamespace

import pytest
from rich.cells import cell_len

import edgemoe
from edgemoe.ui.session import ChatSession
from edgemoe.ui.stats import LiveStats

SIZES = [(80, 24), (120, 40), (160, 45), (200, 60)]
GiB = 2**30
# Key names as the help text writes them -> pilot key names.
PILOT_KEYS = {"Esc": "escape", "F1": "f1", "q": "q", "?": "question_mark"}


@pytest.fixture(scope="module")
def loader(converted_fixture):
    return partial(edgemoe.load, converted_fixture, n_ctx=256, n_threads=1)


def greedy_session(loader) -> ChatSession:
    # Through /set, so the test does not depend on how sampling is spelled.
    s = ChatSession(loader)
    for line in ("/set n-predict 8", "/set temp 0", "/set seed 0"):
        s.execute(line)
    return s


def large_figures(info, budget: int):
    """A 30B-class converted model under ``budget`` (92% of it used): 48
    layers of 128 experts, a long cached prompt, hits at three levels: the
    widest lines the panels draw."""
    plan = SimpleNamespace(
        backbone=budget // 5,
        kv_cache=budget * 3 // 20,
        scratch=budget // 10,
        runtime=budget // 50,
        budget=budget,
        total=budget,
        experts=budget // 2,
        slots=(1024, 2048, 512),
    )
    levels = (2, 4, 8)
    info = dataclasses.replace(info, levels=levels, n_expert=128, plan=plan)
    live = LiveStats(
        prompt_tokens=30000,
        cached_tokens=12345,
        generation_tokens=4096,
        ttft_s=12.345,
        prompt_tps=1234.5,
        generation_tps=12.3,
        token_ms=tuple(50.0 + i % 17 for i in range(120)),
        stall_fraction=0.375,
        hit_rate={2: 0.912, 4: 0.805, 8: 0.7},
        read_per_token=123.45 * 2**20,
        rss_bytes=budget - GiB // 3,
        peak_rss_bytes=budget - GiB // 5,
        resident_bytes={2: budget * 3 // 20, 4: budget // 5, 8: budget // 10},
        residency=tuple(
            (i, tuple((0, *levels)[(i * 7 + e) % 4] for e in range(128)))
            for i in range(48)
        ),
    )
    return info, live


def shown(app) -> list:
    """The main screen's widgets that take up space now."""
    return [w for w in app.screen.walk_children() if w.region]


def layout_problems(app, size: tuple[int, int]) -> list[str]:
    """What is out of place on the screen now, one line per problem."""
    from textual.containers import ScrollableContainer
    from textual.widgets import Sparkline

    from edgemoe.ui.widgets import Fitted

    screen = app.screen.region
    problems = [] if tuple(screen.size) == size else [f"screen {screen}"]
    for w in shown(app):
        what = f"{w!r} at {w.region} in {w.parent!r} at {w.parent.region}"
        # A scroll container's children may run past it (and the screen)
        # vertically, never sideways; everything else lies wholly inside.
        if isinstance(w.parent, ScrollableContainer):
            left, right = w.parent.region.x, w.parent.region.right
            if not (left <= w.region.x and w.region.right <= right):
                problems.append(f"sideways out of its parent: {what}")
        elif not screen.contains_region(w.region):
            problems.append(f"off the screen: {what}")
        elif not w.parent.region.contains_region(w.region):
            problems.append(f"out of its parent: {what}")
        if isinstance(w, Fitted):
            lines = str(w.content).split("\n")
            wide = [x for x in lines if cell_len(x) > w.size.width]
            if wide:
                problems.append(f"wraps at {w.size.width} cells: {wide[0]!r} in {what}")
            elif len(lines) != w.size.height:
                problems.append(f"{len(lines)} lines in {w.size.height} rows: {what}")
        # A scrollbar shows only inside a border (the old side column drew
        # one beside the panels), and never sideways: nothing is too wide.
        if w.show_vertical_scrollbar and w.styles.border_right[0] in ("", "none"):
            problems.append(f"scrollbar outside a border: {what}")
        if w.show_horizontal_scrollbar:
            problems.append(f"too wide, scrolls sideways: {what}")
        if isinstance(w, Sparkline) and w.size.height != 3:
            problems.append(f"sparkline cut: {what}")
    return problems


def check_layout(app, size: tuple[int, int]) -> None:
    problems = layout_problems(app, size)
    assert not problems, "\n".join(problems)


def panel_text(app) -> str:
    from edgemoe.ui.widgets import LatencyPanel, MemoryPanel, StatsStrip

    return "\n".join(
        [
            str(app.query_one(MemoryPanel).content),
            app.query_one(LatencyPanel).text,
            str(app.query_one(StatsStrip).content),
        ]
    )


async def check_help(app, pilot) -> None:
    """F1 shows help that fits the screen and names the keys that close it;
    each of them does."""
    from edgemoe.ui.widgets import HelpScreen

    async def open_help():
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        return app.screen.query_one("#help")

    box = await open_help()
    assert app.screen.region.contains_region(box.region), box.region
    text = str(box.content)
    widest = max(text.split("\n"), key=cell_len)
    assert cell_len(widest) <= box.size.width, f"help wraps: {widest!r}"
    assert len(text.split("\n")) <= box.size.height, "help cut at the bottom"
    assert "Ctrl+C" in text and "F2" in text
    said = re.search(r"^(.+) closes this help$", text, re.M)
    assert said, "the help does not say how to close it"
    closers = re.split(r", | or ", said[1])
    assert "Esc" in closers, closers
    for i, key in enumerate(closers):
        if i:
            await open_help()
        await pilot.press(PILOT_KEYS[key])
        assert not isinstance(app.screen, HelpScreen), f"{key} kept it open"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_layout_fits(loader, size):
    from edgemoe.ui.app import ChatApp
    from edgemoe.ui.widgets import ChatPane, PromptInput, StatsStrip

    app = ChatApp(greedy_session(loader))
    narrow = size[0] < 110

    async def main():
        async with app.run_test(size=size) as pilot:
            app.query_one(PromptInput).load_text("def main():")
            await pilot.press("enter")
            while app.busy:
                await pilot.pause(0.02)
            await pilot.pause()
            check_layout(app, size)
            chat = app.query_one(ChatPane)
            # 60 columns: a code line reads whole; the panels give way first.
            assert chat.region.width >= min(60, size[0]), chat.region
            strip = app.query_one(StatsStrip)  # the folded panels, narrow only
            assert bool(strip.region) == narrow and "F2 panels" in str(strip.content)
            await check_help(app, pilot)

            # F2: narrow, the panels (whole and fitting) in place of the chat;
            # wide, the chat alone. F2 again restores the layout.
            await pilot.press("f2")
            panels = {w.id for w in shown(app)} >= {"memory", "latency-spark"}
            assert panels == narrow and bool(chat.region) != narrow
            check_layout(app, size)
            await pilot.press("f2")
            assert app.query_one(PromptInput).has_focus
            check_layout(app, size)

            # A large model's figures: GiB rows at 24 GiB, MiB in the
            # thousands at 6 GiB. Shown narrow with F2 too.
            for budget in (6 * GiB, 24 * GiB):
                app.info, live = large_figures(app.info, budget)
                app.show_stats(live)
                await pilot.pause()
                check_layout(app, size)
                if narrow:
                    await pilot.press("f2")
                    check_layout(app, size)
                    await pilot.press("f2")
            text = panel_text(app)
            assert re.search(r"prompt +1234\.5 t/s", text)
            assert re.search(r"hits +L2 91%", text)
            await pilot.press("ctrl+q")

    asyncio.run(main())
    app.session.close()


def test_panel_text_never_wraps():
    """Panel lines at widths from the side column down to 20 columns: none
    wider than the width, every row's unit on its own line's end."""
    from edgemoe.ui.stats import ModelInfo
    from edgemoe.ui.widgets import latency_text, memory_text

    plain = ModelInfo("m", (8,), 8, 256, 10 * 2**20, 2**20, "balanced")
    models = [large_figures(plain, b) for b in (6 * GiB, 24 * GiB)]
    models.append((plain, models[0][1]))  # unconverted: no plan, no levels
    for info, live in models:
        for width in (20, 30, 44, 75):
            for text in (
                memory_text(info, live, width),
                latency_text(info, live, width),
            ):
                lines = str(text).split("\n")
                assert max(map(cell_len, lines)) <= width, (width, lines)
                for line in lines:
                    assert line.strip() not in ("MiB", "GiB"), lines
                    # A figure row ends in its unit, even where it broke.
                    if re.match(r"(backbone|KV|scratch|L\d|free) [\d,.]+( |$)", line):
                        assert line.endswith(("MiB", "GiB")), line


def test_layout_follows_resizes(loader):
    """The terminal shrinks and grows under a running chat, once with the
    panels hidden and once with the help open: the panels fold and come back,
    and nothing is left out of place or laid out for the old width."""
    from edgemoe.ui.app import ChatApp
    from edgemoe.ui.widgets import ChatPane, HelpScreen, PromptInput, StatsStrip

    app = ChatApp(greedy_session(loader))

    async def main():
        async with app.run_test(size=(200, 60)) as pilot:
            # The widest lines: the strip has more than fits at 80 columns.
            app.info, live = large_figures(app.info, 24 * GiB)
            app.show_stats(live)
            for size in [(100, 30), (80, 24), (120, 40)]:
                await pilot.resize_terminal(*size)
                await pilot.pause()
                check_layout(app, size)
                strip = app.query_one(StatsStrip)
                assert bool(strip.region) == (size[0] < 110)
                if strip.region:  # laid out for its width: the headline fits
                    assert re.match(
                        r"RSS .* · budget .* · [\d.]+ t/s", str(strip.content)
                    )
            # Panels hidden with F2 while wide: narrower, the chat stays.
            await pilot.press("f2")
            await pilot.resize_terminal(90, 30)
            await pilot.pause()
            check_layout(app, (90, 30))
            assert (
                app.query_one(ChatPane).region and app.query_one(PromptInput).has_focus
            )
            await pilot.press("f1")
            await pilot.resize_terminal(130, 40)
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.pause()
            check_layout(app, (130, 40))
            assert not app.query_one(StatsStrip).region
            await pilot.press("ctrl+q")

    asyncio.run(main())
    app.session.close()
