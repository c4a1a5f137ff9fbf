"""Notebook views: HTML summaries, run.plot, and watch() following a real live run."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

import expman
import expman.notebook
from _helpers import wait_for


def test_run_and_experiment_html(root):
    with expman.start_experiment("nb", "html", root=root) as exp:
        exp.log_parameters({"lr": 0.1, "opt": {"name": "adam"}, "note": "<b>x</b>"})
        for step in range(200):
            exp.log_metrics({"loss": 1 / (step + 1), "acc": step / 200}, step=step)
        exp.log_metric("phase", "done", step=199)
        html = exp._repr_html_()  # live: pending or partial, never an error
        assert "nb/html" in html
    wait_for(lambda: expman.open_run(exp.run_dir).status == "finished", 10, "the run to finish")
    run = expman.open_run(exp.run_dir)
    page = run._repr_html_()
    assert "status <b>finished</b>" in page and "ranks 1 of 1 (1 finished)" in page
    assert "opt.name" in page and "&lt;b&gt;x&lt;/b&gt;" in page  # escaped
    assert re.search(r"<td>loss</td><td>0.005</td><td>199</td><td>200</td><td><svg", page)
    assert "<td>phase</td><td>done</td>" in page
    assert page.count("<polyline") == 2  # acc and loss; text has no chart
    assert exp._repr_html_() == page


def test_plot(root):
    pytest.importorskip("matplotlib")
    with expman.start_experiment("nb", "plot", root=root) as exp:
        for step in range(20):
            exp.log_metrics({"loss": 1 / (step + 1), "acc": step / 20}, step=step)
    run = expman.open_run(exp.run_dir)
    fig = run.plot(["loss", "acc"])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "acc"]
    assert list(fig.axes[0].lines[0].get_xdata()) == list(range(20))
    with pytest.raises(ValueError, match="no numeric points"):
        run.plot("missing")


LIVE = """
import sys, time, expman
with expman.start_experiment("nb", "live", root=sys.argv[1], heartbeat_interval=0.5) as exp:
    print(exp.run_dir, flush=True)
    for step in range(12):
        exp.log_metric("loss", 1 / (step + 1), step=step)
        time.sleep(0.15)
"""


def test_watch_follows_a_live_run_until_it_ends(root, tmp_path):
    script = tmp_path / "live.py"
    script.write_text(textwrap.dedent(LIVE))
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
    try:
        run_dir = proc.stdout.readline().strip()
        pages: list[str] = []
        last = expman.notebook.watch(run_dir, ["loss"], every=0.2, timeout=30, display=pages.append)
    finally:
        proc.wait(30)
    assert proc.returncode == 0
    assert "status <b>finished</b>" in last and last == pages[-1]
    assert len(pages) >= 3
    counts = [int(m.group(1)) for p in pages if (m := re.search(r"<td>loss</td><td>[^<]*</td><td>\d+</td><td>(\d+)</td>", p))]
    assert counts[-1] == 12 and counts[0] < 12  # it saw the run while it was still logging
    assert any("status <b>running</b>" in p or "waiting for the collector" in p for p in pages[:-1])


def test_watch_arguments(root):
    with pytest.raises(ValueError):
        expman.notebook.watch("x", every=0)
    pages: list[str] = []
    out = expman.notebook.watch("no-such-run", every=0.05, timeout=0.2, display=pages.append)
    assert "waiting for the collector" in out and len(pages) >= 2


def _media_run(root):
    pytest.importorskip("PIL")
    import numpy as np

    with expman.start_experiment("nb", "media", root=root) as exp:
        for step in range(5):
            exp.log_metric("loss", 1 / (step + 1), step=step)
            exp.log_histogram("weights", step=step, edges=[0.0, 1.0, 2.0], counts=[step, 5 - step])
        exp.log_image("samples", np.full((6, 8, 3), 200, dtype=np.uint8), step=4, caption="a <gray> one")
        exp.log_table("eval", [{"id": 1}], step=4)
    wait_for(lambda: expman.open_run(exp.run_dir).media().num_rows == 2, 30, "the media to land")
    return expman.open_run(exp.run_dir)


def test_summary_shows_the_latest_image_and_histogram(root):
    import base64
    import io

    from PIL import Image

    run = _media_run(root)
    page = run._repr_html_()
    found = re.search(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert found, page
    pixels = Image.open(io.BytesIO(base64.b64decode(found.group(1))))
    assert pixels.size == (8, 6) and pixels.getpixel((0, 0)) == (200, 200, 200)
    assert "samples · step 4 · rank 0 · a &lt;gray&gt; one" in page
    assert page.count('class="expman-hist"') == 1 and "weights · step 4 · rank 0" in page
    assert "also: eval (table)" in page and "media (3)" in page


NOTEBOOK_CELLS = [
    "import expman, expman.notebook\nrun = expman.open_run({run_dir!r})",
    "run.plot(['loss'])",
    "run",
    "expman.notebook.watch(run, every=0.1)",
]


def test_plot_and_watch_in_a_jupyter_kernel(root):
    """A real kernel (nbclient): `run.plot()` is an image/png output with no %matplotlib magic,
    the run shows as HTML with its image, and watch() shows HTML once, never its raw text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    run = _media_run(root)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.format(run_dir=str(run.path)))
                                         for c in NOTEBOOK_CELLS])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = [cell.outputs for cell in nb.cells]
    assert not any(o.output_type == "error" for cell in outputs for o in cell), outputs
    plotted = [o for o in outputs[1] if o.output_type == "execute_result"]
    assert plotted and plotted[0].data["image/png"], outputs[1]
    shown = outputs[2][0].data
    assert "text/html" in shown and "data:image/png;base64," in shown["text/html"]
    watched = outputs[3]
    assert [o.output_type for o in watched] == ["display_data"], watched
    assert "status <b>finished</b>" in watched[0].data["text/html"]
    assert not any("&lt;div" in str(o.get("data", {}).get("text/plain", "")) or "<div" in str(
        o.get("data", {}).get("text/plain", "")) for o in watched)
