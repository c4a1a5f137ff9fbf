"""Snapshots of the main screens (pytest-textual-snapshot): fixed runs, fixed clock, UTC, 120x36 terminal.

Update after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import time

import pytest
from textual.widgets import Input
from _tui_runs import NOW, make_root, make_run, private_tui_state, write_hardware  # noqa: F401 (autouse)

from expman.tui.app import ExpmanApp
from expman.tui.screens.compare import CompareScreen
from expman.tui.screens.run import RunScreen
from expman.tui.screens.runs import RunsScreen
from expman.tui.widgets.chart import MetricChart

SIZE = (120, 36)


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root").mkdir()
    make_root(tmp_path / "root")
    yield ExpmanApp("root", clock=lambda: NOW, poll_interval=60.0)  # no refresh while the picture is taken
    monkeypatch.delenv("TZ")
    time.tzset()


async def settle(pilot, condition, timeout: float = 60.0) -> None:
    """Wait until `condition()` holds, then make the picture deterministic: a focused
    input's cursor blinks on a timer, so it is held still (on) before the snapshot."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the screen did not settle"
        await pilot.pause(0.05)
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause(0.2)


def drawn(screen) -> bool:
    charts = list(screen.query(MetricChart))
    return bool(charts) and all(c.lines for c in charts)


async def runs_ready(pilot) -> None:
    await settle(pilot, lambda: isinstance(pilot.app.screen, RunsScreen) and pilot.app.screen.scans)


def test_runs_screen(snap_compare, app):
    assert snap_compare(app, terminal_size=SIZE, run_before=runs_ready)


def test_run_screen_charts(snap_compare, app):
    async def open_wide(pilot):
        await runs_ready(pilot)
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(pilot.app.screen, RunScreen) and drawn(pilot.app.screen))

    assert snap_compare(app, terminal_size=SIZE, run_before=open_wide)


def test_run_screen_mean_band_and_ranks(snap_compare, app):
    async def ranks(pilot):
        await runs_ready(pilot)
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(pilot.app.screen, RunScreen) and drawn(pilot.app.screen))
        await pilot.press("m", "2")
        await settle(pilot, lambda: pilot.app.screen.query("#rank-table"))

    assert snap_compare(app, terminal_size=SIZE, run_before=ranks)


def test_compare_screen(snap_compare, app):
    async def compare(pilot):
        await runs_ready(pilot)
        await pilot.press("space", "down", "space", "c")
        await settle(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and drawn(pilot.app.screen))

    assert snap_compare(app, terminal_size=SIZE, run_before=compare)


def test_help_screen(snap_compare, app):
    async def help_(pilot):
        await runs_ready(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=help_)


async def open_run(pilot, downs: int = 0, keys: list[str] | None = None) -> None:
    await runs_ready(pilot)
    await pilot.press(*["down"] * downs, "enter")
    await settle(pilot, lambda: isinstance(pilot.app.screen, RunScreen) and drawn(pilot.app.screen))
    if keys:
        pilot.app.screen.query_one("KeyPicker").choose(keys)
        await settle(pilot, lambda: len(pilot.app.screen.grid.keys) == len(keys) and drawn(pilot.app.screen)
                     and len(list(pilot.app.screen.query(MetricChart))) == len(keys))


def test_run_screen_grid_smoothed_log_y(snap_compare, app):
    """Three keys in a grid, smoothing on (raw faint behind), log y."""
    async def grid(pilot):
        await open_run(pilot, 1, ["loss", "acc", "lr"])
        await pilot.press("s", "s", "s", "l")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=grid)


def test_run_screen_zoomed_solo_rank(snap_compare, app):
    """The 4-rank run per rank, zoomed in 4x, rank 3 (the straggler) alone."""
    async def solo(pilot):
        await open_run(pilot)
        await pilot.press("m", "n", "n", "n", "n", "o", "plus", "plus", "period")
        await settle(pilot, lambda: pilot.app.screen._last_request[2] > 1000 and drawn(pilot.app.screen))

    assert snap_compare(app, terminal_size=SIZE, run_before=solo)


def test_run_screen_failed_with_traceback(snap_compare, app):
    async def failed(pilot):
        await open_run(pilot, 2)
        await pilot.press("5")
        await settle(pilot, lambda: "division by zero" in "\n".join(pilot.app.screen.query_one("#log-view").lines))

    assert snap_compare(app, terminal_size=SIZE, run_before=failed)


def test_compare_outlier_run_is_pinned_not_flattening(snap_compare, app, tmp_path):
    """A diverged run (loss ~2,000x) beside two healthy ones: the robust range keeps theirs readable."""
    make_run(tmp_path / "root", "mnist", "diverged", "dddd0001", start=NOW - 100, steps=200, scale=2000.0)

    async def compare(pilot):
        await settle(pilot, lambda: isinstance(pilot.app.screen, RunsScreen) and pilot.app.screen.scans
                     and len(pilot.app.screen.shown) == 4)
        await pilot.press("space", "down", "space", "down", "space", "c")
        await settle(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and drawn(pilot.app.screen))

    assert snap_compare(app, terminal_size=SIZE, run_before=compare)


def test_run_screen_hardware_per_rank(snap_compare, app, tmp_path):
    run = tmp_path / "root" / "mnist" / "wide-aaaa0002"
    rows = [(t, "node01", None, "process.rss_bytes", 2e9 + r * 5e8 + t * 1e7 * (r == 3), None, r)
            for t in range(60) for r in range(4)]
    rows += [(t, "node01", None, "cpu.percent", 100.0, None, None) for t in range(60)]
    rows += [(t, "node01", "GPU-aaaa-1111-2222-3333", "gpu.temperature_c", 60 + (t == 30) * 25, None, 0)
             for t in range(60)]
    write_hardware(run, rows)

    async def hardware(pilot):
        await open_run(pilot)
        await pilot.press("3")
        await settle(pilot, lambda: pilot.app.screen.query("#hardware-panel")
                     and pilot.app.screen.query_one("#hardware-panel").series)

    assert snap_compare(app, terminal_size=SIZE, run_before=hardware)


def test_runs_screen_filtered_by_parameter(snap_compare, app):
    async def filtered(pilot):
        await runs_ready(pilot)
        await pilot.press("slash", *"lr<0.002")
        await settle(pilot, lambda: len(pilot.app.screen.shown) == 2)

    assert snap_compare(app, terminal_size=SIZE, run_before=filtered)
