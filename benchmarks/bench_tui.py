"""expman-tui: time to first chart for big runs, and how fast live points reach the screen.

Time to first chart: a finished run of N points is written in the storage schema as the
collector leaves it (1 M-row parts merged into one by the collector's own write_part,
128k-row groups, zstd, chart summary in the footer),
then, per trial, with a cold MetricsSource (no cache; the OS page cache is warm):
  data   refresh + list keys + read and bucket "loss" + braille rendering at 160 columns
  app    headless ExpmanApp (Textual run_test, 160x45): open_run() until the chart is drawn
  grid   the same, with all 4 keys chosen (remembered for the experiment): until every chart
         of the grid is drawn (the 4-key layout only)
Two layouts: "loss" is 1 of 4 keys (N/4 of its points, 2 ranks) and "loss" holds all N.

Live: a writer process logs 100k points/s (a "probe" key every 10 ms whose value is the
wall time it was logged, plus 99 filler points per probe) through a real local
collector, while the app shows "probe"; latency = when a probe value reaches the chart
minus when it was logged; and, every 50 ms, the age of the newest probe on the chart
(what the user sees: it includes the poll interval). The event loop's lag (a 50 ms timer's delay) says whether the
UI stayed responsive.

Idle: N finished runs (run.yaml and one small metrics part each, 20 experiments), the
app on the Runs screen with the default poll, nothing changing; the process's CPU time
over --idle-seconds after the list settled, as a share of one core (issue #20: <= 2%).

    python benchmarks/bench_tui.py                  # 1M and 10M, live 8 s, idle with 2,000 runs
    python benchmarks/bench_tui.py --points 1000000 --trials 5 --live-seconds 0
    python benchmarks/bench_tui.py --points --live-seconds 0 --idle-runs 2000   # idle only
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402


def write_run(root: Path, name: str, points: int, keys: int, ranks: int) -> Path:
    import pyarrow.parquet as pq

    from expman._storage.layout import Part, metrics_schema, part_name, write_yaml_atomic
    from expman.collector._parts import write_part

    run = root / "bench" / f"{name}-00000001"
    (run / "metrics").mkdir(parents=True)
    schema = metrics_schema()
    per_step = keys * ranks
    pieces = []
    tables = c.synthetic_points(points, ["loss", "acc", "lr", "grad_norm"][:keys], ranks, lambda i, step: step * 1000)
    for n, table in enumerate(tables):
        path = run / "metrics" / part_name(0, n, n, "bench")
        pq.write_table(table, path, row_group_size=131_072)
        pieces.append(Part("bench", n, n, 0, path))
    # The collector's final merge: one part, with its chart summary in the footer.
    write_part(pieces, run / "metrics" / part_name(3, 0, len(pieces) - 1, "bench"), schema, summarize=True)
    for piece in pieces:
        piece.path.unlink()
    last = int((points - 1) // per_step)
    write_yaml_atomic(run / "run.yaml", {
        "id": "00000001", "name": name, "experiment": "bench", "status": "finished",
        "started_at": "2026-11-18T08:26:40+00:00", "ended_at": "2026-11-18T09:26:40+00:00", "duration_s": 3600.0,
        "world_size": ranks, "hosts": ["node01"],
        "ranks": {r: {"host": "node01", "status": "finished", "last_step": last} for r in range(ranks)}})
    return run


def data_path(run: Path) -> float:
    from expman.tui.data.series import MetricsSource
    from expman.tui.widgets.braille import render
    from expman.tui.widgets.chart import lines_for_run

    t0 = time.perf_counter()
    source = MetricsSource(run)
    source.refresh()
    source.keys()
    series = source.series(["loss"], "step", target=4 * 149)["loss"]
    render(lines_for_run(series, "ranks"), 160, 40, series.x_range)
    return time.perf_counter() - t0


async def app_first_grid(run: Path, trials: int, keys: list[str]) -> list[float]:
    """Open the run with `keys` remembered for its experiment: until every chart of the grid is drawn."""
    import os

    from expman.tui.app import ExpmanApp
    from expman.tui.data import view_state
    from expman.tui.widgets.chart import MetricChart
    from expman.tui.widgets.chart_view import ChartView

    state = c.make_tmpdir("tui-state")
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(state)
    try:
        view_state.save(run.parent.name, keys, ChartView(), None)
        app = ExpmanApp(run.parent.parent, poll_interval=0.25)

        def grid_drawn(charts: list[MetricChart]) -> float | None:
            if len(charts) == len(keys) and all(ch.first_drawn_at for ch in charts):
                return max(ch.first_drawn_at for ch in charts)
            return None

        return await time_opening(app, run, trials, grid_drawn, "grid")
    finally:
        if old is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = old
        c.rmtree_quiet(state)


async def app_first_chart(run: Path, trials: int) -> list[float]:
    from expman.tui.app import ExpmanApp
    from expman.tui.widgets.chart import MetricChart

    def first_drawn(charts: list[MetricChart]) -> float | None:
        drawn = [ch.first_drawn_at for ch in charts if ch.first_drawn_at]
        return drawn[0] if drawn else None

    return await time_opening(ExpmanApp(run.parent.parent, poll_interval=0.25), run, trials, first_drawn, "chart")


async def time_opening(app: Any, run: Path, trials: int, drawn_at: Callable[[list[Any]], float | None],
                       what: str) -> list[float]:
    """Open `run` from the Runs screen `trials` times; each time, the seconds until
    `drawn_at(the Run screen's charts)` gives the moment the wanted drawing was done."""
    from expman.tui.screens.run import RunScreen
    from expman.tui.screens.runs import RunsScreen
    from expman.tui.widgets.chart import MetricChart

    out = []
    async with app.run_test(size=(160, 45)) as pilot:
        while not (isinstance(app.screen, RunsScreen) and app.screen.scans):
            await pilot.pause(0.01)
        for _ in range(trials):
            t0 = time.monotonic()
            app.open_run(run)
            while True:
                screen = app.screen
                done = drawn_at(list(screen.query(MetricChart))) if isinstance(screen, RunScreen) else None
                if done is not None:
                    out.append(done - t0)
                    break
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"no {what} after 60 s")
                await asyncio.sleep(0.002)
            app.pop_screen()
            await pilot.pause(0.3)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


WRITER = textwrap.dedent("""
    import sys, time, expman
    root, seconds, rate = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    exp = expman.start_experiment("live", "writer", root=root)
    lm, lms = exp.log_metric, exp.log_metrics
    filler = {f"layer{k}/grad": 0.0 for k in range(99)}
    start = time.perf_counter(); step = 0
    while time.perf_counter() - start < seconds:
        for _ in range(10):  # 10 probes (and 990 filler points) per 100 ms slice
            lms(filler, step=step)
            lm("probe", time.time(), step=step)
            step += 1
        ahead = start + step * 100 / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    print(step * 100 / (time.perf_counter() - start), flush=True)
    exp.finish()
""")


async def live(seconds: float, rate: int) -> dict:
    from expman.tui.app import ExpmanApp
    from expman.tui.screens.run import RunScreen
    from expman.tui.screens.runs import RunsScreen

    tmp = c.make_tmpdir("tui-live")
    root = tmp / "root"
    logging_until = time.time() + seconds  # the writer logs for `seconds` from its own start, a little later
    writer = subprocess.Popen([c.PYTHON, "-c", WRITER, str(root), str(seconds), str(rate)], stdout=subprocess.PIPE, text=True)
    latencies: list[float] = []
    ages: list[float] = []  # every 50 ms: how old the newest probe on the chart is
    lags: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not list(root.glob("live/*/run.yaml")):
            if time.monotonic() > deadline:
                raise RuntimeError("the writer's run never appeared")
            await asyncio.sleep(0.05)
        app = ExpmanApp(root, poll_interval=0.25)
        async with app.run_test(size=(160, 45)) as pilot:
            while not (isinstance(app.screen, RunsScreen) and app.screen.shown):
                await pilot.pause(0.05)
            app.open_run(app.screen.shown[0].path)
            while not (isinstance(app.screen, RunScreen) and app.screen.polls):
                await pilot.pause(0.05)
            screen = app.screen
            screen.query_one("KeyPicker").choose(["probe"])
            seen = None
            end = time.monotonic() + seconds
            while time.monotonic() < end and writer.poll() is None:
                t0 = time.monotonic()
                await asyncio.sleep(0.05)
                lags.append(time.monotonic() - t0 - 0.05)
                probe = screen.series.get("probe")
                if probe is not None and probe.last_value is not None:
                    if time.time() < logging_until:  # afterwards the newest point just gets older
                        ages.append(time.time() - probe.last_value)
                    if probe.last_value != seen:
                        seen = probe.last_value
                        latencies.append(time.time() - seen)
        achieved = float(writer.communicate(timeout=120)[0].strip() or 0)
    finally:
        if writer.poll() is None:
            writer.kill()
        c.rmtree_quiet(tmp)
    return {"latencies": latencies, "ages": ages, "lags": lags, "rate": achieved}


def write_finished_runs(root: Path, n: int) -> None:
    """n small finished runs as the collector leaves them (no fsync: this is only the set-up)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from expman._storage.layout import metrics_schema, part_name

    steps = pa.array(range(20), pa.int64())
    table = pa.Table.from_arrays([
        pa.DictionaryArray.from_arrays(pa.array([0] * 20, pa.int32()), pa.array(["loss"])),
        pa.array([1.0 / (i + 1) for i in range(20)]), pa.nulls(20, pa.string()), steps,
        pa.array([0] * 20, pa.int32()),
        pa.DictionaryArray.from_arrays(pa.array([0] * 20, pa.int32()), pa.array(["node01"])),
        pa.array([1_795_000_000_000_000 + i for i in range(20)]).cast(pa.timestamp("us", tz="UTC")),
    ], schema=metrics_schema())
    for i in range(n):
        run = root / f"exp{i % 20}" / f"run{i}-{i:08x}"
        (run / "metrics").mkdir(parents=True)
        pq.write_table(table, run / "metrics" / part_name(0, 0, 0, "bench"))
        info = {"id": f"{i:08x}", "name": f"run{i}", "experiment": f"exp{i % 20}", "status": "finished",
                "started_at": f"2026-11-18T08:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
                "ended_at": "2026-11-18T09:26:40+00:00", "duration_s": 3600.0, "world_size": 1,
                "hosts": ["node01"], "ranks": {0: {"host": "node01", "status": "finished", "last_step": 19}}}
        (run / "run.yaml").write_text(yaml.safe_dump(info), encoding="utf-8")


async def idle_cpu(root: Path, seconds: float) -> tuple[float, int]:
    """Share of one core the app uses on the Runs screen while nothing changes, and the scans it made."""
    from expman.tui.app import ExpmanApp
    from expman.tui.screens.runs import RunsScreen

    app = ExpmanApp(root)
    async with app.run_test(size=(160, 45)) as pilot:
        while not (isinstance(app.screen, RunsScreen) and app.screen.scans >= 2):
            await pilot.pause(0.05)
        await pilot.pause(2.0)  # let the first table settle
        scans = app.screen.scans
        c0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        used, wall = time.process_time() - c0, time.monotonic() - t0
        return used / wall, app.screen.scans - scans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--app-trials", type=int, default=3)
    parser.add_argument("--live-seconds", type=float, default=8.0)
    parser.add_argument("--live-rate", type=int, default=100_000)
    parser.add_argument("--idle-runs", type=int, default=2000, help="finished runs for the idle measurement (0: skip)")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(c.machine_line())
    rows = []
    tmp = c.make_tmpdir("tui")
    try:
        for points in args.points:
            for keys, ranks in ((4, 2), (1, 1)):
                label = f"{points / 1e6:g}M, loss = {points // keys / 1e6:g}M pts, {ranks} rank(s)"
                t0 = time.perf_counter()
                run = write_run(tmp, f"p{points}-k{keys}", points, keys, ranks)
                print(f"{label}: wrote in {time.perf_counter() - t0:.1f} s; measuring", flush=True)
                data = [data_path(run) for _ in range(args.trials)]
                app = asyncio.run(app_first_chart(run, args.app_trials)) if args.app_trials else []
                grid = asyncio.run(app_first_grid(run, args.app_trials, ["loss", "acc", "lr", "grad_norm"]))  \
                    if args.app_trials and keys == 4 else []
                rows.append([label, f"{statistics.median(data):.3f} s", f"{pct(data, 0.99):.3f} s",
                             f"{statistics.median(app):.3f} s" if app else "-", f"{max(app):.3f} s" if app else "-",
                             f"{statistics.median(grid):.3f} s" if grid else "-"])
                c.rmtree_quiet(run)
    finally:
        c.rmtree_quiet(tmp)
    print()
    print(c.table(rows, ["run", "data p50", "data p99", "app p50", "app max", "4-key grid p50"]))
    if args.live_seconds > 0:
        result = asyncio.run(live(args.live_seconds, args.live_rate))
        lat, lags = result["latencies"], result["lags"]
        print(f"\nlive: writer logged {result['rate'] / 1e3:.0f}k points/s; {len(lat)} probe updates on the chart")
        if lat:
            print(f"  logged -> on the chart: p50 {statistics.median(lat):.2f} s, p99 {pct(lat, 0.99):.2f} s, "
                  f"max {max(lat):.2f} s (target 1 s)")
        ages = result["ages"]
        if ages:
            print(f"  age of the newest point on the chart, sampled every 50 ms: p50 {statistics.median(ages):.2f} s, "
                  f"p99 {pct(ages, 0.99):.2f} s, max {max(ages):.2f} s (target 1 s)")
        if lags:
            print(f"  UI event-loop lag: p50 {statistics.median(lags) * 1e3:.0f} ms, p99 {pct(lags, 0.99) * 1e3:.0f} ms, "
                  f"max {max(lags) * 1e3:.0f} ms")
    if args.idle_runs > 0:
        tmp = c.make_tmpdir("tui-idle")
        try:
            t0 = time.perf_counter()
            write_finished_runs(tmp / "root", args.idle_runs)
            print(f"\nidle: {args.idle_runs} finished runs written in {time.perf_counter() - t0:.1f} s; "
                  f"watching the Runs screen for {args.idle_seconds:g} s", flush=True)
            share, scans = asyncio.run(idle_cpu(tmp / "root", args.idle_seconds))
            print(f"  idle CPU: {share * 100:.2f}% of a core ({scans} scans; target <= 2%)")
        finally:
            c.rmtree_quiet(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
