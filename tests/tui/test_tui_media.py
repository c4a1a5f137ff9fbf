"""The Run screen's Media tab driven by Textual's pilot, on a run logged through a real
collector from two ranks: images at a step with the step slider and rank key, a histogram
key as a heatmap, a table as a DataTable."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import run_async, until
from _tui_runs import private_tui_state  # noqa: F401 (autouse)

import expman
from expman.tui.app import ExpmanApp
from expman.tui.data.media import heatmap, read_catalog
from expman.tui.screens.run import RunScreen
from expman.tui.screens.runs import RunsScreen
from expman.tui.widgets.half_blocks import UPPER
from expman.tui.widgets.media_panel import MediaPanel, MediaView
from textual.widgets import DataTable

pytest.importorskip("PIL")

SIZE = (120, 40)


RANK = '''
import sys
import numpy as np
import expman

rank = int(sys.argv[1])
with expman.start_experiment("vision", "media", root=sys.argv[2], collector=sys.argv[3], run_id="tuimedia01",
                             rank=rank, world_size=2, code_dir=False) as exp:
    for step in (0, 10, 20):
        image = np.zeros((8, 16, 3), dtype=np.uint8)
        image[:, :, 0] = 255 if rank == 0 else 0      # rank 0 red, rank 1 blue
        image[:, :, 2] = 0 if rank == 0 else 255
        image[:4, :, 1] = step * 10                   # the top half's green tells the step
        exp.log_image("samples", image, step=step)
        exp.log_histogram("weights", step=step, edges=[0.0, 1.0, 2.0, 3.0], counts=[step, 5, 1])
        exp.log_metric("loss", 1.0 / (step + 1), step=step)
    if rank == 0:
        exp.log_table("eval", [{"id": i, "text": f"sample {i}"} for i in range(3)], step=20)
print("RUN-DIR", exp.run_dir)
'''


@pytest.fixture
def media_run(collector, tmp_path: Path) -> Path:
    """Two ranks' images, histograms and (rank 0) a table, through a real collector."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(collector.root), collector.endpoint],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(out)
    return Path(outs[0].split("RUN-DIR ")[1].strip())


def cell_colors(view: MediaView) -> list[set[tuple]]:
    """Per line of the view, the (upper, lower) RGB pairs of its half-block cells."""
    text = view.render()
    lines: list[set[tuple]] = [set() for _ in text.plain.split("\n")]
    starts = [i for i, ch in enumerate(text.plain) if ch == "\n"]
    for span in text.spans:
        style = span.style
        if text.plain[span.start:span.end].strip(UPPER) == "" and style.color and style.bgcolor:
            line = sum(1 for at in starts if at < span.start)
            lines[line].add((style.color.get_truecolor()[:3], style.bgcolor.get_truecolor()[:3]))
    return [found for found in lines if found]


def top_and_bottom(view: MediaView) -> tuple[set[tuple], set[tuple]]:
    lines = cell_colors(view)
    return lines[0], lines[-1]


@run_async
async def test_media_tab_images_steps_ranks_histogram_heatmap_and_table(media_run):
    catalog = read_catalog(expman.open_run(media_run))
    assert [(k.key, k.kind, k.steps, k.ranks) for k in catalog.keys] == [
        ("samples", "image", [0, 10, 20], [0, 1]), ("weights", "histogram", [0, 10, 20], [0, 1]),
        ("eval", "table", [20], [0])]
    app = ExpmanApp(media_run.parent.parent, poll_interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans, what="the runs")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls, what="the run screen")
        screen = app.screen
        await pilot.press("7")
        assert screen.query_one("#tabs").active == "media"
        panel = await until(pilot, lambda: list(screen.query(MediaPanel)), what="the media panel")
        panel = panel[0]
        # The first key (the images) at its last step, rank 0: red, green top half of 200.
        await until(pilot, lambda: panel.shown == ("samples", 20, 0), what="samples at step 20")
        view = panel.query_one(MediaView)
        table = panel.query_one("#media-table", DataTable)
        green, red = ((255, 200, 0),) * 2, ((255, 0, 0),) * 2
        assert top_and_bottom(view) == ({green}, {red})
        assert "step 20" in str(panel.query_one("#media-slider").render()) and "3/3" in str(
            panel.query_one("#media-slider").render())
        await pilot.press("left")  # the slider: one step back
        await until(pilot, lambda: panel.shown == ("samples", 10, 0), what="step 10")
        assert top_and_bottom(view) == ({((255, 100, 0),) * 2}, {red})
        await pilot.press("shift+left")
        await until(pilot, lambda: panel.shown == ("samples", 0, 0), what="the first step")
        await pilot.press("r")  # the other rank: blue
        await until(pilot, lambda: panel.shown == ("samples", 0, 1), what="rank 1")
        assert top_and_bottom(view) == ({((0, 0, 255),) * 2}, {((0, 0, 255),) * 2})
        await pilot.press("shift+right")
        await until(pilot, lambda: panel.shown == ("samples", 20, 1), what="rank 1's last step")

        await pilot.press("down")  # the histograms: a heatmap with a row per step
        await until(pilot, lambda: panel.shown == ("weights", 20, 1), what="the heatmap")  # the rank chosen stays
        await pilot.press("r")
        await until(pilot, lambda: panel.shown == ("weights", 20, 0), what="rank 0's heatmap")
        assert view.display and not table.display
        lines = view.render().plain.splitlines()
        assert lines[0].split()[0] == "0" and any(line.split()[0].startswith("20") for line in lines[:-1])
        assert "▶" in "".join(lines) and lines[-1].split() == ["0", "3"]  # the value range under it
        await pilot.press("down")  # the table; only rank 0 logged it
        await until(pilot, lambda: panel.shown == ("eval", 20, 0), what="the table")
        assert table.display and not view.display
        assert [str(c.label) for c in table.columns.values()] == ["id", "text"]
        assert [table.get_row_at(i)[1] for i in range(table.row_count)] == ["sample 0", "sample 1", "sample 2"]

        await pilot.press("q")


def test_heatmap_rebins_onto_one_grid():
    rows = [(0, 0, [0.0, 1.0, 2.0], [4.0, 0.0]), (5, 0, [0.0, 2.0, 4.0], [0.0, 8.0]), (5, 1, [0.0, 1.0], [1.0])]
    counts, steps, span = heatmap(rows, rank=0, bins=4)
    assert steps == [0, 5] and span == (0.0, 4.0)
    assert counts.tolist() == [[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]]
    assert counts.sum(axis=1).tolist() == [4.0, 8.0]  # counts are spread, never lost
    empty, none, _ = heatmap(rows, rank=3)
    assert empty.shape == (0, 48) and none == []


def test_a_run_without_media_reads_nothing(tmp_path):
    run = type("R", (), {"path": tmp_path})()
    assert read_catalog(run) is None


@run_async
async def test_images_go_through_the_terminals_graphics_protocol_where_it_has_one(media_run):
    """Where detect() found Kitty's protocol or Sixel, textual-image draws the image; the
    heatmap stays in half blocks."""
    widget = pytest.importorskip("textual_image.widget")
    from expman.tui.widgets import terminal_graphics

    terminal_graphics.use(widget.TGPImage, "tgp")
    try:
        app = ExpmanApp(media_run.parent.parent, poll_interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans, what="the runs")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls, what="the run screen")
            await pilot.press("7")
            panel = (await until(pilot, lambda: list(app.screen.query(MediaPanel)), what="the media panel"))[0]
            await until(pilot, lambda: panel.shown == ("samples", 20, 0), what="samples at step 20")
            picture = panel.query_one("#media-picture", widget.TGPImage)
            assert picture.display and not panel.query_one(MediaView).display
            assert np.array_equal(np.asarray(picture.image), expected_pixels(0, 20))
            await pilot.press("down")  # the histograms: half blocks again
            await until(pilot, lambda: panel.shown[0] == "weights", what="the heatmap")
            assert panel.query_one(MediaView).display and not picture.display
            await pilot.press("q")
    finally:
        terminal_graphics.use(None)


def test_detect_needs_a_terminal_and_can_be_turned_off(monkeypatch):
    from expman.tui.widgets import terminal_graphics

    assert terminal_graphics.detect() is None  # pytest's stdin is no terminal: half blocks, nothing asked
    monkeypatch.setenv(terminal_graphics.ENV, "off")
    assert terminal_graphics.detect() is None and terminal_graphics.picture_widget() is None


def expected_pixels(rank: int, step: int) -> np.ndarray:
    """The image RANK logs from `rank` at `step`."""
    image = np.zeros((8, 16, 3), dtype=np.uint8)
    image[:, :, 0] = 255 if rank == 0 else 0
    image[:, :, 2] = 0 if rank == 0 else 255
    image[:4, :, 1] = step * 10
    return image


@run_async
async def test_a_live_run_s_new_images_follow_on_the_latest_step(tmp_path):
    """On the latest step, the Media tab moves on with a live run (a real local collector)."""
    root = tmp_path / "live"
    exp = expman.start_experiment("live", "media", root=root, code_dir=False)
    try:
        exp.log_image("samples", expected_pixels(0, 0), step=0)
        exp.log_metric("loss", 1.0, step=0)
        await until_files(lambda: (exp.run_dir / "run.yaml").exists()
                          and expman.open_run(exp.run_dir).media().num_rows == 1)
        app = ExpmanApp(root, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.scans, what="the runs")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.polls, what="the run screen")
            await pilot.press("7")
            panel = (await until(pilot, lambda: list(app.screen.query(MediaPanel)), what="the media panel"))[0]
            await until(pilot, lambda: panel.shown == ("samples", 0, 0), timeout=30, what="the first image")
            exp.log_image("samples", expected_pixels(0, 1), step=1)
            await until(pilot, lambda: panel.shown == ("samples", 1, 0), timeout=30, what="the new step")
            await pilot.press("left")  # looking back: a new step does not pull the view away
            await until(pilot, lambda: panel.shown == ("samples", 0, 0), what="step 0 again")
            exp.log_image("samples", expected_pixels(0, 2), step=2)
            await until(pilot, lambda: panel.entry is not None and panel.entry.steps == [0, 1, 2], timeout=30,
                        what="step 2 in the slider")
            assert panel.shown == ("samples", 0, 0)
            await pilot.press("q")
    finally:
        exp.finish()


async def until_files(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the collector"
        await asyncio.sleep(0.05)
