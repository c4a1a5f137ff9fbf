"""The TUI driven by Textual's pilot: navigation, filters, compare, help, and a live run from a real collector."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from _helpers import run_async, until
from _tui_runs import NOW, make_root, make_run, private_tui_state  # noqa: F401 (autouse)

import expman
from expman.tui.app import ExpmanApp
from expman.tui.screens.compare import CompareScreen
from expman.tui.screens.help import HelpScreen
from expman.tui.screens.run import RunScreen
from expman.tui.screens.runs import RunsScreen
from expman.tui.widgets.chart import MetricChart
from textual.widgets import DataTable, Log

SIZE = (120, 40)


def rows(app) -> list[str]:
    table = app.screen.query_one("#runs", DataTable)
    return [str(table.get_row_at(i)[2]) for i in range(table.row_count)]


@pytest.fixture
def fixed_root(tmp_path: Path) -> Path:
    make_root(tmp_path)
    return tmp_path


@run_async
async def test_runs_screen_lists_newest_first_and_filters(fixed_root):
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans, what="the first scan")
        assert rows(app) == ["wide-aaaa0002", "baseline-aaaa0001", "resnet-bbbb0001"]
        table = app.screen.query_one("#runs", DataTable)
        assert "loss" in [str(c.label) for c in table.columns.values()]
        await pilot.press("slash", *"mnist base")
        assert rows(app) == ["baseline-aaaa0001"]
        await pilot.press("escape")  # clears the filter
        assert len(rows(app)) == 3
        await pilot.press("s", "s")  # all -> running -> finished
        assert app.screen.status_filter == "finished" and rows(app) == ["baseline-aaaa0001"]
        await pilot.press("s")  # -> failed
        assert rows(app) == ["resnet-bbbb0001"]


@run_async
async def test_runs_filter_by_parameters_metrics_and_tags_with_param_columns_and_sort(fixed_root):
    import yaml

    info_path = fixed_root / "mnist" / "baseline-aaaa0001" / "run.yaml"
    info = yaml.safe_load(info_path.read_text())
    info["tags"] = ["sweep-3"]
    info_path.write_text(yaml.safe_dump(info))
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans, what="the first scan")
        table = app.screen.query_one("#runs", DataTable)
        labels = [str(c.label) for c in table.columns.values()]
        assert "lr=" in labels and "optimizer.beta=" in labels  # the parameters that differ between runs
        await pilot.press("slash", *"lr=0.003")
        assert rows(app) == ["wide-aaaa0002"]
        await pilot.press("escape", "slash", *"lr<0.002 acc>0.99")  # a parameter and a metric
        assert rows(app) == ["baseline-aaaa0001"]
        await pilot.press("escape", "slash", *"optimizer.name=adam")
        assert rows(app) == ["wide-aaaa0002", "baseline-aaaa0001"]
        await pilot.press("escape", "slash", *"tag:sweep-3")
        assert rows(app) == ["baseline-aaaa0001"]
        await pilot.press("escape", "slash", *"loss<0.5 tag:nope")
        assert rows(app) == []
        await pilot.press("escape")
        await until(pilot, lambda: len(rows(app)) == 3)
        app.screen.sort_by = "loss"  # what clicking the loss header does
        app.screen._sorted()
        assert rows(app) == ["resnet-bbbb0001", "baseline-aaaa0001", "wide-aaaa0002"]  # lowest loss first
        await pilot.press("O")
        assert rows(app) == ["wide-aaaa0002", "baseline-aaaa0001", "resnet-bbbb0001"]
        assert "sorted by loss ↓" in str(app.screen.query_one("#sort").render())
        await pilot.click("#runs", offset=(2, 0))  # a header click: sort by experiment
        await until(pilot, lambda: app.screen.sort_by == "experiment")
        assert rows(app)[0] == "resnet-bbbb0001"  # cifar < mnist


@run_async
async def test_navigation_run_tabs_help_and_back(fixed_root):
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        await pilot.press("down", "enter")  # the second row: baseline
        await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls, what="the run screen")
        screen = app.screen
        assert screen.run.path.name == "baseline-aaaa0001"
        chart = await until(pilot, lambda: [c for c in screen.query(MetricChart) if c.lines], what="a chart")
        assert chart[0].key == "loss" and "last" in chart[0].title.plain
        await pilot.press("2")
        assert screen.query_one("#tabs").active == "ranks"
        await pilot.press("4")
        params = screen.query_one("#params-table", DataTable)
        await until(pilot, lambda: params.row_count >= 3, what="params")
        assert "optimizer.name" in [str(params.get_row_at(i)[0]) for i in range(params.row_count)]
        await pilot.press("5")
        assert "line 4 of baseline" in "\n".join(screen.query_one(Log).lines)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert ("m", "Median/ranks/mean") in app.screen.rows and ("q", "Quit") in app.screen.rows
        await pilot.press("escape")
        assert app.screen is screen
        await pilot.press("1", "slash", *"acc", "enter")  # fuzzy filter, enter picks the best match
        await until(pilot, lambda: [c.key for c in screen.query(MetricChart)] == ["acc"], what="the acc chart")
        await until(pilot, lambda: screen.query_one(MetricChart).lines, what="acc drawn")
        await pilot.press("2")  # the tab keys work right after enter in the filter
        assert screen.query_one("#tabs").active == "ranks"
        await pilot.press("1")
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        started = time.monotonic()
        await pilot.press("q")
    assert time.monotonic() - started < 20  # a hang, not a speed: no waiting on a reader thread


@run_async
async def test_run_with_ranks_median_solo_mean_and_time_axis(fixed_root):
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        await pilot.press("enter")  # wide: 4 ranks, rank 3 behind
        await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls)
        screen = app.screen
        chart = await until(pilot, lambda: [c for c in screen.query(MetricChart) if c.lines])
        # The default: the median with the min-max band, and the straggler on its own line.
        assert [line.label for line in chart[0].lines] == ["median", "r3 slowest"]
        assert chart[0].lines[0].band and chart[0].lines[1].x.max() < chart[0].lines[0].x.max()
        await pilot.press("m")  # every rank its own line and colour
        assert [line.label for line in chart[0].lines] == ["r0", "r1", "r2", "r3"]
        assert len({line.color for line in chart[0].lines}) == 4
        await pilot.press("n", "n")  # select r1: drawn last (on top), its own last value in the title
        assert screen.view.selected == "r1" and chart[0].drawn[-1].label == "r1"
        assert "(r1)" in chart[0].title.plain
        await pilot.press("o")  # solo r1
        assert [line.label for line in chart[0].drawn] == ["r1"]
        await pilot.press("a", "m")  # all back; the mean over ranks
        assert [line.label for line in chart[0].lines] == ["mean"] and chart[0].lines[0].band
        updates = chart[0].updates
        await pilot.press("x")
        await until(pilot, lambda: chart[0].updates > updates and screen.series["loss"].xkind == "time")
        ranks = screen.query_one("#rank-table", DataTable)
        assert ranks.row_count == 4
        assert "straggler" in str(ranks.get_row_at(3)[-1])


@run_async
async def test_compare_overlays_runs_and_diffs_params(fixed_root):
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        await pilot.press("c")  # nothing marked: a warning, no screen change
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("space", "down", "space", "c")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.polls)
        screen = app.screen
        chart = await until(pilot, lambda: [c for c in screen.query(MetricChart) if c.lines])
        assert [line.label for line in chart[0].lines] == ["mnist/wide·aaaa0002", "mnist/baseline·aaaa0001"]
        diff = screen.query_one("#params-diff", DataTable)
        assert [str(diff.get_row_at(i)[0]) for i in range(diff.row_count)] == ["lr", "optimizer.beta"]
        await pilot.press("d")
        assert diff.row_count == 4  # all parameters


@run_async
async def test_chart_grid_pages_smoothing_log_zoom_and_memory(fixed_root):
    """Three keys share the screen; s, l, +, 0 change every chart; the choice comes back next time."""
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        await pilot.press("down", "enter")  # baseline
        screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls and app.screen)
        screen.query_one("KeyPicker").choose(["loss", "acc", "lr"])
        await until(pilot, lambda: len([c for c in screen.query(MetricChart) if c.lines]) == 3, what="three charts")
        charts = list(screen.query(MetricChart))
        assert charts[0].region.y == charts[1].region.y  # side by side: two columns fit in 130 cells
        assert all(c.region.height >= 8 for c in charts)
        await pilot.press("s", "l")
        assert screen.view.smoothing > 0 and screen.view.log_y
        assert [line.faint for line in charts[0].drawn] == [True, False]  # raw faint behind the smoothed line
        assert "smooth 0.6" in str(screen.query_one("#run-header").render())
        await pilot.press("plus", "plus")
        assert screen.view.zoom == 4.0
        await until(pilot, lambda: screen._last_request[2] >= 4 * 16, what="a finer read for the zoom")
        x0, x1 = charts[0].view.visible_x(charts[0].x_range)
        assert (x1 - x0) == (charts[0].x_range[1] - charts[0].x_range[0]) / 4
        await pilot.press("0")
        assert screen.view.zoom == 1.0
        # The mouse: the wheel over a chart zooms around the pointer (no pilot helper: its own event path).
        from textual import events

        plot_x = charts[0].size.width - 3  # near the right edge of the plot
        await pilot._post_mouse_events([events.MouseScrollUp], charts[0], offset=(plot_x, 5))
        await until(pilot, lambda: screen.view.zoom == 1.5, what="a wheel zoom")
        assert screen.view.x_window[1] > 0.9  # zoomed towards where the pointer was
        await pilot.press("0")
        # A click on a legend entry selects that series; a second click hides it.
        start, _end, label = charts[0]._legend_spans[0]
        await pilot.click(charts[0], offset=(start + 2, 0))
        assert screen.view.selected == label == "r0"
        start = charts[0]._legend_spans[0][0]  # the title now also shows r0's own last value: the legend moved
        await pilot.click(charts[0], offset=(start + 2, 0))
        assert "r0" in screen.view.hidden and charts[0].drawn == []
        await pilot.press("a")
        await pilot.press("g")  # one chart per row: three rows
        await until(pilot, lambda: len({c.region.y for c in screen.query(MetricChart)}) == 3, what="one column")
        await pilot.press("escape", "enter")  # reopen a run of the same experiment: the same keys and toggles
        screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls and app.screen)
        await until(pilot, lambda: [c.key for c in screen.query(MetricChart)] == ["loss", "acc", "lr"])
        assert screen.view.smoothing == 0.6 and screen.view.log_y and screen.view.columns == 1


@run_async
async def test_many_keys_go_on_pages(fixed_root):
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:  # room for two charts at a time
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        await pilot.press("down", "enter")
        screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls and app.screen)
        screen.query_one("KeyPicker").choose(["loss", "acc", "lr"])
        await until(pilot, lambda: len(screen.grid.keys) == 3, what="three keys chosen")
        await until(pilot, lambda: [c.key for c in screen.query(MetricChart)] == ["loss", "acc"], what="page 1")
        assert screen.grid.pages == 2  # two charts a page fit in 20 rows
        await pilot.press("right_square_bracket")
        await until(pilot, lambda: [c.key for c in screen.query(MetricChart) if c.lines] == ["lr"], what="page 2")
        assert "page 2/2" in str(screen.query_one("#run-header").render())
        await pilot.resize_terminal(80, 40)  # taller: all three fit, and the new charts are drawn at once
        await until(pilot, lambda: [c.key for c in screen.query(MetricChart) if c.lines] == ["loss", "acc", "lr"],
                    what="three charts after the resize")
        assert screen.grid.pages == 1


@run_async
async def test_failed_run_shows_its_exception(fixed_root):
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        await pilot.press("down", "down", "enter")  # resnet: failed
        screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls and app.screen)
        banner = screen.query_one("#run-error")
        assert banner.display and "ZeroDivisionError: division by zero" in str(banner.render())
        await pilot.press("5")
        log = await until(pilot, lambda: "\n".join(screen.query_one(Log).lines), what="the log")
        assert "ZeroDivisionError: division by zero" in log and 'File "train.py", line 42' in log


@run_async
async def test_compare_keeps_an_outlier_run_from_flattening_the_others(fixed_root):
    make_run(fixed_root, "mnist", "diverged", "dddd0001", start=NOW - 100, steps=200, scale=2000.0)
    make_run(fixed_root, "mnist", "baseline", "cccc0001", start=NOW - 200, steps=200, scale=1.1)  # same name
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and len(rows(app)) == 5)
        assert rows(app)[:2] == ["diverged-dddd0001", "baseline-cccc0001"]
        await pilot.press("space", "down", "space", "down", "down", "space", "c")
        screen = await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.polls and app.screen)
        chart = (await until(pilot, lambda: [c for c in screen.query(MetricChart) if c.lines]))[0]
        labels = [line.label for line in chart.lines]
        assert labels == ["mnist/diverged·dddd0001", "mnist/baseline·cccc0001", "mnist/baseline·aaaa0001"]
        from expman.tui.widgets.chart_view import y_range

        lo, hi = y_range(screen.view, chart.drawn, chart.x_range)
        assert screen.view.robust and hi < 10  # the healthy runs fill the chart, the diverged one is pinned on top
        await pilot.press("n")  # select the diverged run and hide it
        assert screen.view.selected == labels[0]
        await pilot.press("h")
        assert [line.label for line in chart.drawn] == labels[1:]
        await pilot.press("r")  # robust off: with the diverged run hidden, the plain range is the healthy one
        assert not screen.view.robust and y_range(screen.view, chart.drawn, chart.x_range)[1] < 10


@run_async
async def test_unreadable_artifact_manifest_is_an_error_not_a_list_of_hashes(fixed_root):
    from expman._storage.layout import ARTIFACTS_DIR, MANIFEST
    from expman.tui.widgets.artifacts_list import ArtifactsList

    run = fixed_root / "mnist" / "baseline-aaaa0001"
    (run / ARTIFACTS_DIR / "ab").mkdir(parents=True)
    (run / ARTIFACTS_DIR / "ab" / ("ab" + "0" * 62)).write_bytes(b"content")  # an object, as the store keeps it
    (run / ARTIFACTS_DIR / MANIFEST).mkdir()  # a manifest that cannot be read
    app = ExpmanApp(fixed_root, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        await pilot.press("down", "enter")
        screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls and app.screen)
        await pilot.press("6")
        listing = await until(pilot, lambda: screen.query(ArtifactsList) and screen.query_one(ArtifactsList))
        await until(pilot, lambda: listing.row_count and "could not read the artifacts" in str(listing.get_row_at(0)[0]),
                    what="the manifest's error in the artifacts tab")
        assert listing.row_count == 1  # and no content hashes listed as names


@run_async
async def test_an_ended_run_left_open_is_read_rarely_and_the_runs_list_not_at_all(fixed_root):
    from expman.tui.screens.run import ENDED_POLL_EVERY, ENDED_QUIET_POLLS

    app = ExpmanApp(fixed_root, clock=lambda: NOW, poll_interval=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans)
        runs = app.screen
        await pilot.press("down", "enter")  # baseline: finished
        screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls and app.screen)
        await until(pilot, lambda: screen._quiet >= ENDED_QUIET_POLLS, what="the run to be seen unchanged")
        ticks, polls, scans = screen._ticks, screen.polls, runs.scans
        await until(pilot, lambda: screen._ticks >= ticks + 4 * ENDED_POLL_EVERY, what="timer ticks")
        assert screen.polls - polls <= (screen._ticks - ticks) // ENDED_POLL_EVERY + 1
        assert runs.scans == scans  # the Runs screen underneath does not scan while covered
        await pilot.press("x")  # a new request is read at once
        await until(pilot, lambda: screen.series["loss"].xkind == "time", what="the time axis")


@run_async
async def test_live_run_from_a_real_collector(tmp_path):
    """A run logged through the real collector shows up and its chart and log follow it."""
    root = tmp_path / "live"
    exp = expman.start_experiment("live", "writer", root=root)
    exp.log_parameters({"lr": 0.1})
    step = 0

    def log_some(n: int) -> None:
        nonlocal step
        for _ in range(n):
            exp.log_metric("loss", 1.0 / (step + 1), step=step)
            step += 1

    log_some(100)
    deadline = time.monotonic() + 20
    while not (exp.run_dir / "run.yaml").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    app = ExpmanApp(root, poll_interval=0.2)
    try:
        await _watch_live(app, exp, log_some, lambda: step)
    finally:
        exp.finish()


async def _watch_live(app, exp, log_some, current_step) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and rows(app), timeout=20, what="the live run")
        assert "running" in str(app.screen.query_one("#runs", DataTable).get_row_at(0)[3])
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls)
        screen = app.screen
        chart = await until(pilot, lambda: [c for c in screen.query(MetricChart) if c.lines], timeout=20)
        for round_ in range(3):
            log_some(500)
            exp.info(f"round {round_} done")
            target = current_step() - 1
            await until(pilot, lambda: screen.series.get("loss") and screen.series["loss"].last_x == target,
                        timeout=60, what=f"step {target} on the chart")  # latency: benchmarks/bench_tui.py
        assert f"@ step {current_step() - 1}" in chart[0].title.plain
        await until(pilot, lambda: "round 2 done" in "\n".join(screen.query_one(Log).lines), what="the log line")
        exp.finish()
        await until(pilot, lambda: screen.info.get("status") == "finished", timeout=15, what="status finished")
        # Back on the Runs screen, the row follows run.yaml (re-read because it changed).
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen)
                    and "finished" in str(app.screen.query_one("#runs", DataTable).get_row_at(0)[3]),
                    timeout=15, what="the Runs screen to show the run finished")
