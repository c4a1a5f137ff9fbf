"""expman-tui on a bucket: runs a real collector wrote on local disk, uploaded to a real
S3-protocol server (moto, on loopback) part by part as a collector writing to a bucket
would, opened with `expman-tui s3://bucket/prefix` and driven by Textual's pilot; and
what polling a bucket costs, counted request by request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from _helpers import run_async, until, wait_for
from _tui_runs import private_tui_state  # noqa: F401 (autouse)

import expman
from expman._storage.files import ArrowFiles
from expman.tui import main as tui_main
from expman.tui.app import ExpmanApp
from expman.tui.data.runs import RunIndex
from expman.tui.data.store import Store
from expman.tui.screens.run import RunScreen
from expman.tui.screens.runs import RunsScreen
from expman.tui.widgets.braille import format_step
from expman.tui.widgets.chart import MetricChart
from textual.widgets import DataTable

BUCKET = "runs"
PART_ROWS = 262_144  # the collector writes a part once this many rows wait (collector/_server.py FLUSH_ROWS)


def part_rows(run_dir: Path) -> int:
    """Rows in the run's Parquet parts on local disk (parts only: the WAL stays local)."""
    total = 0
    for part in (run_dir / "metrics").glob("part-*.parquet"):
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except (FileNotFoundError, OSError):  # merged away while we looked: count again
            return -1
    return total


def mirror(run_dir: Path, fs: Any, dest: str) -> None:
    """What a collector writing to a bucket does after a flush: upload what is new or
    rewritten (never the WAL, which stays on local disk), delete what it retired (parts
    merged away)."""
    local = {p.relative_to(run_dir).as_posix(): p for p in run_dir.rglob("*")
             if p.is_file() and not any(n.startswith(".") for n in p.relative_to(run_dir).parts)}  # .wal/, temp files
    selector = pafs.FileSelector(dest, recursive=True, allow_not_found=True)
    remote = {i.path[len(dest) + 1:] for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}
    for rel, path in sorted(local.items(), key=lambda item: item[0].endswith(".yaml")):  # parts, then run.yaml
        if rel not in remote or not rel.startswith("metrics/"):
            try:
                pafs.copy_files(str(path), f"{dest}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
            except FileNotFoundError:  # merged away meanwhile: the next mirror has its successor
                continue
    for rel in remote - local.keys():
        fs.delete_file(f"{dest}/{rel}")


@pytest.fixture
def local_runs(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Experiment "mnist" on local disk, logged through a real (private) collector: `done`
    finished, `live` still running with its first PART_ROWS points in one part (the
    conftest's `_release_expman` ends both after each test)."""
    root = tmp_path / "local"
    with expman.start_experiment("mnist", "done", root=root, run_id="done1", code_dir=False) as done:
        done.log_parameters({"lr": 0.01})
        for step in range(100):
            done.log_metric("loss", 1.0 / (step + 1), step=step)
    live = expman.start_experiment("mnist", "live", root=root, run_id="live1", code_dir=False)
    live.log_parameters({"lr": 0.1})
    for step in range(PART_ROWS):
        live.log_metric("loss", 1.0 / (step + 1), step=step)
    wait_for(lambda: part_rows(live.run_dir) == PART_ROWS, 120, "the first part of the live run")
    yield {"root": root, "live": live, "live_dir": live.run_dir, "done_dir": done.run_dir}


def upload(s3_server: Any, local_runs: dict[str, Any], prefix: str) -> Any:
    fs = s3_server.filesystem()
    if fs.get_file_info(BUCKET).type == pafs.FileType.NotFound:
        fs.create_dir(BUCKET)
    for key in ("done_dir", "live_dir"):
        mirror(local_runs[key], fs, f"{BUCKET}/{prefix}/mnist/{local_runs[key].name}")
    return fs


def rows(app: ExpmanApp) -> list[list[str]]:
    table = app.screen.query_one("#runs", DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def loss_chart(screen: RunScreen) -> MetricChart | None:
    return next((c for c in screen.query(MetricChart) if c.key == "loss" and c.lines), None)


@run_async
async def test_expman_tui_opens_a_run_in_a_bucket_and_shows_parts_as_they_arrive(s3_server, local_runs):
    fs = upload(s3_server, local_runs, "live")
    live_dir: Path = local_runs["live_dir"]
    app = ExpmanApp(f"s3://{BUCKET}/live", poll_interval=0.1)  # the bucket's default is 2 s: quicker here
    assert app.store.remote and app.root == PurePosixPath(f"{BUCKET}/live")
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and len(rows(app)) == 2, 60, "the two runs")
        listed = {row[2]: row[3] for row in rows(app)}
        assert listed == {live_dir.name: "running", local_runs["done_dir"].name: "finished"}
        assert f"s3://{BUCKET}/live" in str(app.screen.query_one("#root").render())
        await pilot.press("enter")  # the newest first: the live run
        await until(pilot, lambda: isinstance(app.screen, RunScreen), 30, "the run screen")
        screen = app.screen
        assert screen.run.path == PurePosixPath(f"{BUCKET}/live/mnist/{live_dir.name}")
        await until(pilot, lambda: loss_chart(screen), 60, "the loss chart")
        assert f"mnist/{live_dir.name}" in str(screen.query_one("#run-header").render())
        assert screen.series["loss"].points == PART_ROWS and screen.series["loss"].last_x == PART_ROWS - 1
        assert f"@ step {format_step(PART_ROWS - 1)}" in loss_chart(screen).title.plain

        def second_part() -> None:  # the run goes on; its next part lands in the bucket
            for step in range(PART_ROWS, 2 * PART_ROWS):
                local_runs["live"].log_metric("loss", 1.0 / (step + 1), step=step)
            wait_for(lambda: part_rows(live_dir) == 2 * PART_ROWS, 120, "the second part")
            mirror(live_dir, fs, f"{BUCKET}/live/mnist/{live_dir.name}")

        await asyncio.to_thread(second_part)
        await until(pilot, lambda: screen.series["loss"].points == 2 * PART_ROWS, 60, "the new part's points")
        assert screen.series["loss"].last_x == 2 * PART_ROWS - 1
        await until(pilot, lambda: f"@ step {format_step(2 * PART_ROWS - 1)}" in loss_chart(screen).title.plain,
                    30, "the chart's title to follow")


@run_async
async def test_expman_tui_follows_a_run_that_a_bucket_collector_writes(s3_server, tmp_path, short_dir):
    """No copying by hand: `expman-collector --root s3://...` uploads the run, and the app follows it."""
    fs = s3_server.filesystem()
    fs.create_dir("collected")
    ready = short_dir / "ready.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "expman.collector", "--root", "s3://collected/team", "--name", "node-a",
                             "--staging-dir", str(tmp_path / "staging"), "--upload-interval", "0.3",
                             "--bind", f"ipc://{short_dir}/c.sock", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the collector")
        endpoint = yaml.safe_load(ready.read_text())["endpoints"][0]
        exp = expman.start_experiment("mnist", "bucketed", collector=endpoint, code_dir=False)

        def log(steps: range) -> None:
            for step in steps:
                exp.log_metric("loss", 1.0 / (step + 1), step=step)

        app = ExpmanApp("s3://collected/team", poll_interval=0.1)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RunsScreen) and rows(app), 60, "the run in the bucket")
            assert rows(app)[0][3] == "running"
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, RunScreen), 30, "the run screen")
            screen = app.screen  # open before the run has a key: it must take up "loss" when its first part lands
            await asyncio.to_thread(log, range(PART_ROWS))
            await until(pilot, lambda: "loss" in screen.series and screen.series["loss"].points == PART_ROWS,
                        60, "the first part's points")
            await asyncio.to_thread(log, range(PART_ROWS, 2 * PART_ROWS))
            await until(pilot, lambda: screen.series["loss"].points == 2 * PART_ROWS, 60, "the second part's points")
            assert screen.series["loss"].last_x == 2 * PART_ROWS - 1
        assert exp.finish()
    finally:
        proc.terminate()
        proc.wait(90)


class CountingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem that counts the requests it passes on to the real one: a HEAD
    per path looked up, a LIST per folder listed, a GET per file opened."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs
        self.requests: Counter[tuple[str, str]] = Counter()

    def get_type_name(self) -> str:
        return "counting"

    def equals(self, other: Any) -> bool:
        return self is other

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        self.requests.update(("head", p) for p in paths)
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        self.requests[("list", selector.base_dir)] += 1
        return self.fs.get_file_info(selector)

    def open_input_stream(self, path: str) -> Any:
        self.requests[("get", path)] += 1
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        self.requests[("get", path)] += 1
        return self.fs.open_input_file(path)

    def create_dir(self, path: str, recursive: bool) -> None:
        raise PermissionError("read only")

    delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = create_dir
    move = copy_file = open_output_stream = open_append_stream = create_dir


def test_polling_a_bucket_lists_folders_now_and_then_and_polls_running_runs_only(s3_server, local_runs):
    upload(s3_server, local_runs, "cost")
    counting = CountingHandler(s3_server.filesystem())
    store = Store(ArrowFiles(pafs.PyFileSystem(counting), "s3://"), PurePosixPath(f"{BUCKET}/cost"), "s3://runs/cost")
    index = RunIndex(store)
    first = index.scan()
    assert sorted((s.name, s.status) for s in first) == [("done", "finished"), ("live", "running")]
    assert first[0].latest or first[1].latest  # latest values from the parts' footers

    counting.requests.clear()
    scans = 2 * RunIndex.BUCKET_LIST_EVERY
    for _ in range(scans):
        assert [s.path for s in index.scan()] == [s.path for s in first]
    done, live = (f"{BUCKET}/cost/mnist/{local_runs[k].name}" for k in ("done_dir", "live_dir"))
    touched = Counter()
    for (kind, path), n in counting.requests.items():
        owner = "done" if path.startswith(done) else "live" if path.startswith(live) else path
        touched[(kind, owner)] += n
    # the finished run: never looked at again; folders: listed once every BUCKET_LIST_EVERY scans
    assert not [k for k in touched if k[1] == "done"]
    assert touched[("list", f"{BUCKET}/cost")] == touched[("list", f"{BUCKET}/cost/mnist")] == 2
    # the running run, each scan: run.yaml and config.yaml looked up, metrics/ listed; its part read once
    assert touched[("head", "live")] == 2 * scans and touched[("list", "live")] == scans
    assert touched[("get", "live")] <= 2  # run.yaml again only if it changed (a heartbeat rewrite)
    assert sum(touched.values()) <= 4 * scans + 4


@run_async
async def test_an_open_run_screen_of_a_live_run_costs_a_few_requests_a_poll(s3_server, local_runs):
    upload(s3_server, local_runs, "open")
    counting = CountingHandler(s3_server.filesystem())
    store = Store(ArrowFiles(pafs.PyFileSystem(counting), "s3://"), PurePosixPath(f"{BUCKET}/open"), "s3://runs/open")
    live = PurePosixPath(f"{BUCKET}/open/mnist/{local_runs['live_dir'].name}")
    app = ExpmanApp(store, poll_interval=0.05)
    async with app.run_test(size=(140, 40)) as pilot:
        app.open_run(live)
        await until(pilot, lambda: isinstance(app.screen, RunScreen) and loss_chart(app.screen), 60, "the chart")
        screen = app.screen
        counting.requests.clear()
        start = screen.polls
        await until(pilot, lambda: screen.polls >= start + 25, 60, "25 polls")
        polls = screen.polls - start
        by_kind = Counter(kind for kind, _path in counting.requests.elements())
    # Each poll: LISTs of metrics/ (before and after the look) and of .wal/, HEADs of run.yaml
    # and run.log; every 5th also params, hardware, artifacts and media. Parts already read
    # are never read again. About 6.4 requests a poll: ~11,500 an hour at the 2 s default.
    assert sum(by_kind.values()) <= 7 * polls + 7, counting.requests
    assert by_kind["get"] <= 2 * (polls // 5 + 1), counting.requests  # config.yaml and the manifest, now and then


def test_expman_tui_refuses_a_bucket_prefix_with_no_runs_in_one_line(s3_server, capsys):
    fs = s3_server.filesystem()
    if fs.get_file_info(BUCKET).type == pafs.FileType.NotFound:
        fs.create_dir(BUCKET)
    assert tui_main([f"s3://{BUCKET}/nothing-here"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"expman-tui: error: s3://{BUCKET}/nothing-here is not a folder (give ROOT, or set EXPMAN_ROOT)"
