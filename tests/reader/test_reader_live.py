"""Reading a run while a real collector writes it: flushes and merges never surface to the
reader as an error, and every look is whole (each key's steps a gap-free prefix)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import expman
from _helpers import wait_for
from expman._reader.live import MetricsTail
from expman._storage.layout import list_parts

KEYS = ("loss", "acc", "lr", "grad")


def check_whole(table: pa.Table) -> int:
    """Each key's steps are exactly 0..n-1 (the rank logs them in order): no gap, no repeat."""
    keys = table["key"].cast(pa.string())
    lengths = set()
    for key in KEYS:
        steps = np.sort(table.filter(pc.equal(keys, key))["step"].to_numpy())
        assert (steps == range(len(steps))).all(), f"{key}: a gap or a repeat"
        lengths.add(len(steps))
    assert max(lengths) - min(lengths) <= 1  # the keys of one step travel in one frame
    return table.num_rows


def test_reads_during_flushes_and_merges_are_whole_and_never_raise(collector, root):
    exp = expman.start_experiment("live", "merging", root=root, collector=collector.endpoint)
    stop = threading.Event()

    def train() -> None:
        step = 0
        while not stop.is_set():
            for _ in range(2000):
                exp.log_metrics({k: step * 0.5 for k in KEYS}, step=step)
                step += 1
            time.sleep(0.01)

    writer = threading.Thread(target=train)
    writer.start()
    try:
        wait_for(lambda: (exp.run_dir / "run.yaml").exists(), 30, "the collector to create the run")
        run = expman.open_run(exp.run_dir)
        wait_for(lambda: list_parts(run.path / "metrics"), 60, "a first part")
        held = [p.path for p in list_parts(run.path / "metrics")]
        stream = run.iter_metrics()  # a lazy read: its parts are held open from here on
        tail = MetricsTail(exp.run_dir)
        rows, merged_reads, deadline = 0, 0, time.monotonic() + 300  # a hang guard, not a timing
        while merged_reads < 3 and time.monotonic() < deadline:
            before = list_parts(run.path / "metrics")
            seen = check_whole(run.metrics())
            assert seen >= rows  # nothing acknowledged disappears between looks
            rows = seen
            tail.poll()  # the TUI's incremental look too
            assert "loss" in run._repr_html_()  # and the notebook summary
            after = list_parts(run.path / "metrics")
            if before != after and any(p.level > 0 for p in after):
                merged_reads += 1  # the collector flushed or merged while this read ran
        assert merged_reads == 3, "the collector never merged while we read"
        assert any(p.level > 0 for p in tail.parts)
        assert not all(path.exists() for path in held)  # merged away meanwhile ...
        assert check_whole(stream.read_all()) > 0  # ... and the stream still reads them whole
    finally:
        stop.set()
        writer.join()
    assert exp.finish() is True
    final = expman.open_run(exp.run_dir)
    assert check_whole(final.metrics()) > rows
