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
