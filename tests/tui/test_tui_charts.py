"""The chart workbench's pure parts and the idle Runs index, on real files: the last value at
the highest step, smoothing, log y, robust range, zoom, the palette's marks, the state file,
and a Runs index that reads nothing while nothing changes."""

from __future__ import annotations

import os
import time

import numpy as np
from _tui_runs import T0, make_run, metrics_table, private_tui_state, write_hardware, write_part  # noqa: F401

from expman._storage.layout import RUN_YAML, read_yaml, write_yaml_atomic
from expman.tui.data import view_state
from expman.tui.data.runs import RunIndex
from expman.tui.data.series import MetricsSource
from expman.tui.widgets.braille import PALETTE, Line, color_for, dashed_for, render
from expman.tui.widgets.chart_view import ChartView, ema, prepare, y_range


def line(label: str, y, x=None) -> Line:
    y = np.asarray(y, float)
    x = np.arange(len(y), dtype=float) if x is None else np.asarray(x, float)
    return Line(label, "cyan", x, y, y, y)


def test_last_value_is_at_the_highest_step_not_the_last_writer(tmp_path):
    """Rank 0 is at step 100, rank 1 (a straggler) wrote last at step 80: the title's value is rank 0's."""
    run = tmp_path / "exp" / "run-1"
    points = [("loss", 1.0 / (s + 1), s, 0, T0 + s) for s in range(101)]
    points += [("loss", 5.0, s, 1, T0 + 200 + s) for s in range(81)]  # arrives after rank 0's points
    write_part(run, metrics_table(points))
    source = MetricsSource(run)
    source.refresh()
    series = source.series(["loss"])["loss"]
    assert series.last_x == 100 and series.last_value == 1.0 / 101
    assert series.last_by_rank == {0: (100.0, 1.0 / 101), 1: (80.0, 5.0)}
    # Two ranks at the same top step: their mean.
    write_part(run, metrics_table([("loss", 3.0, 100, 1, T0 + 500)]), first=1, last=1)
    source.refresh()
    series = source.series(["loss"])["loss"]
    assert series.last_x == 100 and series.last_value == (1.0 / 101 + 3.0) / 2


def test_last_value_from_merged_parts_with_a_summary_and_a_live_tail(tmp_path):
    """A merged part is drawn from its footer summary; a newer part at a higher step wins over it."""
    from expman._storage.layout import list_parts, metrics_schema, part_name
    from expman.collector._parts import write_part as write_merged_part

    run = tmp_path / "exp" / "run-2"
    write_part(run, metrics_table([("loss", 1.0 / (s + 1), s, 0, T0 + s) for s in range(50)]), 0, 0, 0)
    write_part(run, metrics_table([("loss", 9.0, s, 1, T0 + 100 + s) for s in range(40)]), 0, 1, 1)  # straggler, later
    parts = list_parts(run / "metrics")
    write_merged_part(parts, run / "metrics" / part_name(1, 0, 1, "test-host"), metrics_schema(), summarize=True)
    for p in parts:
        p.path.unlink()
    source = MetricsSource(run)
    source.refresh()
    merged = source.series(["loss"])["loss"]
    assert merged.points == 90  # (a footer summary keeps only the point that arrived last, whatever its rank)
    write_part(run, metrics_table([("loss", 0.01, 60, 0, T0 + 300)]), 0, 2, 2)
    source.refresh()
    later = source.series(["loss"])["loss"]
    assert later.last_x == 60 and later.last_value == 0.01 and later.last_by_rank[0] == (60.0, 0.01)


def test_smoothing_is_a_debiased_ema_and_keeps_the_raw_line_faint():
    values = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    assert ema(values, 0.0) is values
    smooth = ema(values, 0.5)
    assert smooth[0] == 1.0 and 0.4 < smooth[-1] < 0.8  # debiased start, then between the extremes
    noisy = np.random.default_rng(1).normal(size=1000)  # across many blocks: the plain recurrence
    acc = norm = 0.0
    plain = []
    for v in noisy:
        acc, norm = acc * 0.95 + 0.05 * v, norm * 0.95 + 0.05
        plain.append(acc / norm)
    assert np.allclose(ema(noisy, 0.95), plain)
    view = ChartView(smoothing=0.9)
    drawn = prepare(view, [line("r0", values)])
    assert [(d.label, d.faint) for d in drawn] == [("r0", True), ("r0", False)]
    assert np.ptp(drawn[1].mid) < np.ptp(drawn[0].mid)


def test_log_y_drops_non_positive_values_and_labels_in_values():
    view = ChartView(log_y=True)
    drawn = prepare(view, [line("r0", [100.0, 10.0, 1.0, 0.0])])
    assert np.allclose(drawn[0].mid[:3], [2, 1, 0]) and np.isnan(drawn[0].mid[3])
    from expman.tui.widgets.chart_view import format_log_value

    rows = render(drawn, 60, 10, (0.0, 3.0), y_format=format_log_value)
    labels = "".join(seg.text for row in rows for seg in row[:1])
    assert "100" in labels and "1" in labels


def test_robust_range_ignores_a_diverged_run_and_a_spike():
    healthy = [line(f"run{i}", 1.0 / (np.arange(200) + 1) + 0.01 * i) for i in range(5)]
    diverged = line("diverged", np.linspace(1, 2460, 200))
    plain = y_range(ChartView(), healthy + [diverged], (0, 199))
    robust = y_range(ChartView(robust=True), healthy + [diverged], (0, 199))
    assert plain[1] >= 2460 and robust[1] < 2
    spiky = np.full(200, 0.5)
    spiky[100] = 1e6
    lo, hi = y_range(ChartView(robust=True), [line("r0", spiky)], (0, 199))
    assert hi < 1


def test_zoom_pan_and_reset_stay_inside_the_run():
    view = ChartView()
    view.zoom_by(4.0, centre=0.9)
    lo, hi = view.x_window
    assert abs((hi - lo) - 0.25) < 1e-9 and lo <= 0.9 <= hi
    view.pan(10)  # far right: stops at the end
    assert view.x_window[1] == 1.0
    assert view.visible_x((0.0, 1000.0)) == (750.0, 1000.0)
    view.zoom_by(1e9)
    assert view.zoom <= 256.0 + 1e-6
    view.reset_zoom()
    assert view.x_window == (0.0, 1.0)
    # Drawn zoomed in: points outside the window are left out, not piled on the edges.
    rows = render([line("r0", np.arange(100.0))], 40, 8, (50.0, 60.0))
    assert "".join(seg.text for seg in rows[-1]).split() == ["50", "60"]


def test_select_hide_solo_and_draw_order():
    lines = [line(f"r{i}", np.arange(10.0) + i) for i in range(4)]
    view = ChartView()
    view.select_next([x.label for x in lines])
    view.select_next([x.label for x in lines])
    assert view.selected == "r1"
    assert [d.label for d in prepare(view, lines)][-1] == "r1"  # on top
    view.toggle_solo()
    assert [d.label for d in prepare(view, lines)] == ["r1"]
    view.show_all()
    view.toggle_hidden()
    assert "r1" not in [d.label for d in prepare(view, lines)]


def test_no_two_series_look_alike_up_to_24():
    marks = {(color_for(i), dashed_for(i)) for i in range(24)}
    assert len(PALETTE) == 12 and len({color_for(i) for i in range(12)}) == 12 and len(marks) == 24


def test_view_state_round_trips_per_experiment_and_survives_a_broken_file():
    view = ChartView(smoothing=0.9, log_y=True, robust=True, columns=2)
    view_state.save("mnist", ["loss", "acc"], view, "ranks")
    keys, loaded, mode = view_state.load("mnist")
    assert keys == ["loss", "acc"] and mode == "ranks"
    assert (loaded.smoothing, loaded.log_y, loaded.robust, loaded.columns) == (0.9, True, True, 2)
    assert view_state.load("cifar") == (None, ChartView(), None)
    view_state.state_path().write_text("experiments: [not, a, mapping", encoding="utf-8")
    assert view_state.load("mnist")[0] is None
    view_state.save("mnist", ["loss"], view, None)  # and the next save writes a whole file again
    assert view_state.load("mnist")[0] == ["loss"]


def test_runs_index_reads_nothing_while_nothing_changes(tmp_path):
    root = tmp_path / "root"
    for i in range(30):
        make_run(root, f"exp{i % 3}", f"run{i}", f"{i:08x}", start=T0 + i, steps=5, log_lines=0)
    live = make_run(root, "exp0", "live", "ffff0001", start=T0 + 100, steps=5, status="running", log_lines=0)
    index = RunIndex(root)
    assert len(index.scan()) == 31 and index.reads == 31
    version = index.version
    for _ in range(3 * RunIndex.SETTLED_SWEEP):
        index.scan()
    assert index.reads == 31 and index.version == version  # quiet: no run.yaml read, nothing to redraw
    # The live run is polled every scan.
    info = read_yaml(live / RUN_YAML)
    info["status"] = "finished"
    time.sleep(0.01)
    write_yaml_atomic(live / RUN_YAML, info)
    assert next(s for s in index.scan() if s.path == live).status == "finished" and index.version > version
    # A new run shows up at the next scan.
    make_run(root, "exp1", "new", "eeee0001", start=T0 + 200, steps=5, log_lines=0)
    assert index.scan()[0].name == "new"
    # A finished run changed on disk (reopened) is seen within one sweep.
    first = root / "exp0" / "run0-00000000"
    info = read_yaml(first / RUN_YAML)
    info["status"] = "running"
    write_yaml_atomic(first / RUN_YAML, info)
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # coarse-mtime filesystems too
    for _ in range(RunIndex.SETTLED_SWEEP):
        found = next(s for s in index.scan() if s.path == first)
    assert found.status == "running"


def test_hardware_per_rank_per_device_whole_history_and_units(tmp_path):
    import expman
    from expman.tui.data.hardware import SPARK_POINTS, read_hardware
    from expman.tui.widgets.hardware_panel import human, scales, sparkline

    run_dir = make_run(tmp_path, "exp", "hw", "hhhh0001", steps=5, ranks=2, log_lines=0)
    rows = []
    for t in range(1000):  # 1,000 samples: far more than a sparkline's width
        for rank in (0, 1):
            rows.append((t, "node01", None, "process.rss_bytes", 2e9 + rank * 1e9 + (t % 2) * 1e8, None, rank))
        rows.append((t, "node01", None, "cpu.percent", 100.0, None, None))  # constant, pegged
        rows.append((t, "node01", "GPU-aaaa-1111-2222", "gpu.temperature_c", 60.0 + (t == 500) * 30, None, 0))
        rows.append((t, "node01", "GPU-bbbb-3333-4444", "gpu.temperature_c", 50.0, None, 1))
    rows.append((0, "node01", "GPU-aaaa-1111-2222", "gpu.name", None, "NVIDIA H100", 0))
    write_hardware(run_dir, rows)
    series = read_hardware(expman.open_run(run_dir))
    rss = [s for s in series if s.key == "process.rss_bytes"]
    assert [s.rank for s in rss] == [0, 1]  # one series per rank, not one sawtooth
    assert rss[0].high == 2.1e9 and rss[1].low == 3e9
    temps = [s for s in series if s.key == "gpu.temperature_c"]
    assert [s.device for s in temps] == ["GPU-aaaa-1111-2222", "GPU-bbbb-3333-4444"]
    assert SPARK_POINTS // 2 <= len(temps[0].values) <= SPARK_POINTS and max(temps[0].values) == 90.0  # spike kept
    cpu = next(s for s in series if s.key == "cpu.percent")
    assert cpu.constant and cpu.latest == 100.0
    assert next(s for s in series if s.key == "gpu.name").text == "NVIDIA H100"
    assert scales(series)[("cpu", "%")] == (0.0, 100.0)
    assert sparkline((100.0, 100.0), 0.0, 100.0) == "██"  # a pegged CPU is a full bar on the 0-100 scale
    assert human(8.14e10, "B") == "81.4 GB" and human(1.25e7, "B/s") == "12.5 MB/s" and human(71, "°C") == "71 °C"


def test_hardware_tab_shows_ranks_and_units(tmp_path):
    import asyncio

    from _tui_runs import NOW
    from rich.console import Console

    from expman.tui.app import ExpmanApp
    from expman.tui.screens.run import RunScreen
    from expman.tui.widgets.hardware_panel import HardwarePanel

    run_dir = make_run(tmp_path, "exp", "hw", "hhhh0001", steps=5, ranks=2, log_lines=0)
    write_hardware(run_dir, [(t, "node01", None, "process.rss_bytes", 2e9 + r * 1e9 + t * 1e6, None, r)
                             for t in range(100) for r in (0, 1)]
                   + [(t, "node01", None, "cpu.percent", 100.0, None, None) for t in range(100)])

    async def until(pilot, condition, timeout=15.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await pilot.pause(0.05)
        return condition()

    async def body() -> str:
        app = ExpmanApp(tmp_path, clock=lambda: NOW)
        async with app.run_test(size=(140, 36)) as pilot:
            await until(pilot, lambda: getattr(app.screen, "scans", 0))
            await pilot.press("enter")
            screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls and app.screen)
            await pilot.press("3")
            panel = (await until(pilot, lambda: [p for p in screen.query(HardwarePanel) if p.series]))[0]
            console = Console(width=140, record=True, file=open(os.devnull, "w"))
            console.print(panel.table)
            return console.export_text()

    text = asyncio.run(body())
    lines = [line.split() for line in text.splitlines()]
    rss = [line for line in lines if "process.rss_bytes" in line]
    assert [line[1] for line in rss] == ["0", "1"]  # host, rank, key, ...: one row per rank
    assert rss[0][-2:] == ["2.1", "GB"] and "2 GB–2.1 GB" in text  # human units, the whole run's range
    assert any("cpu.percent" in line and "constant" in line and line[-1] == "100.0%" for line in lines)


def test_filter_words_compare_numbers_as_numbers_and_text_only_for_equality():
    from expman.tui.data.run_filter import compare, param_columns
    from expman.tui.data.runs import summarize

    run = summarize(tmp := __import__("pathlib").Path("/r/exp/a-1"), {"name": "a", "tags": ["x"]},
                    {"loss": 0.4}, {"lr": 0.001, "opt.name": "Adam", "layers": [64, 64]})
    assert run.matches("lr=1e-3 loss<0.5 opt.name=adam tag:x") and not run.matches("loss>=0.5")
    assert not run.matches("opt.name<b") and run.matches("missing!=1") and not run.matches("missing=1")
    assert compare(True, "=", "1") and not compare("abc", ">", "abd")
    other = summarize(tmp.with_name("b-2"), {"name": "b"}, {}, {"lr": 0.01, "opt.name": "Adam", "layers": [64, 64]})
    assert param_columns([run, other]) == ["lr"]
