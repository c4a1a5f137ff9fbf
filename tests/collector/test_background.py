"""Parts written and merged beside the receive loop (collector/_background.py): a wide run
finishing never holds up another run, and a collector killed mid-write or mid-merge loses
and doubles nothing."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

import expman
from expman._storage.layout import list_parts
from conftest import start_collector

WIDE_KEYS = 40_000
FRESH_PARTS = ("--part-age", "0.5")  # a part while the run is live (by default a short run has one, at its end)


def log_wide(exp: expman.Experiment, keys: range) -> None:
    for first in range(keys.start, keys.stop, 1000):
        exp.log_metrics({f"k/{i:07d}": float(i) for i in range(first, min(first + 1000, keys.stop))}, step=0)


def stored_keys(run_dir: Path) -> list[str]:
    """Every stored row's key, from the parts a reader uses (pyarrow: no expman reader)."""
    keys: list[str] = []
    for part in list_parts(run_dir / "metrics"):
        keys += pq.read_table(part.path, columns=["key"])["key"].to_pylist()
    return keys


def test_a_wide_run_finishing_does_not_hold_up_another_run(root, collector):
    wide = expman.start_experiment("e", "wide", root=root, collector=collector.endpoint, finish_timeout=120)
    other = expman.start_experiment("e", "other", root=root, collector=collector.endpoint, finish_timeout=120)
    n = 3000
    logged = threading.Event()

    def log_other() -> None:
        for step in range(n):
            other.log_metric("loss", float(step), step=step)
            if step % 100 == 0:
                time.sleep(0.005)  # keeps logging while the wide run finishes
        logged.set()

    writer = threading.Thread(target=log_other)
    writer.start()
    log_wide(wide, range(WIDE_KEYS))
    assert wide.finish() is True
    writer.join()
    assert other.finish() is True
    steps = expman.open_run(other.run_dir).metrics("loss")["step"].to_pylist()
    assert sorted(steps) == list(range(n))
    keys = stored_keys(wide.run_dir)
    assert len(keys) == WIDE_KEYS and len(set(keys)) == WIDE_KEYS


def test_kill_9_while_parts_are_written_or_merged_loses_and_doubles_nothing(root, short_dir):
    """The collector is SIGKILLed while a part is being written or merged in the background
    (a `.tmp` part is there); the next collector recovers what the WAL holds, drops what a
    wider part covers, and every point is stored exactly once."""
    c = start_collector(root, short_dir, None, *FRESH_PARTS)
    endpoint = c.endpoint
    exp = expman.start_experiment("e", "killed", root=root, collector=endpoint, finish_timeout=120)
    kills = 0
    try:
        for rnd in range(3):
            metrics = exp.run_dir / "metrics"
            log_wide(exp, range(rnd * WIDE_KEYS, (rnd + 1) * WIDE_KEYS))
            deadline = time.monotonic() + 60
            while not list(metrics.glob(".part-*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.001)
            if list(metrics.glob(".part-*.tmp")):
                os.kill(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
                kills += 1
                c = start_collector(root, short_dir, endpoint, *FRESH_PARTS)
        assert kills >= 1, "no part was ever seen being written"
        assert exp.finish() is True
        assert c.stop() == 0  # a clean stop waits for the background
        keys = stored_keys(exp.run_dir)
        assert len(keys) == 3 * WIDE_KEYS, f"{len(keys)} rows after {kills} kills"
        assert len(set(keys)) == 3 * WIDE_KEYS
        assert not list((exp.run_dir / "metrics").glob(".*.tmp"))
    finally:
        assert c.stop() == 0


def test_merges_take_neighbours_and_leave_settled_parts_until_finish():
    """Amplification: a merged part of SETTLED_ROWS or more is not merged again before finish,
    and only neighbouring parts merge (a merged part's name covers its inputs' segments)."""
    from expman._storage.layout import Part
    from expman.collector._parts import MERGE_FANIN, SETTLED_ROWS, next_merge

    def part(level: int, first: int, last: int) -> Part:
        return Part("w", first, last, level, Path(f"p-{level}-{first}-{last}"))

    fresh = [part(0, i, i) for i in range(8, 8 + MERGE_FANIN)]
    assert next_merge(fresh) == (fresh, 1)
    big = [part(1, i * 8, i * 8 + 7) for i in range(MERGE_FANIN)]
    rows = {p.path: SETTLED_ROWS for p in big}
    assert next_merge(big, lambda p: rows[p.path]) is None  # settled: left for finish
    rows = {p.path: 10 for p in big}
    assert next_merge(big, lambda p: rows[p.path]) == (big, 2)  # small: folded together
    rows[big[3].path] = SETTLED_ROWS  # a settled part in the middle: its neighbours may not merge across it
    assert next_merge(big, lambda p: rows[p.path]) is None


def test_merges_run_at_a_lower_cpu_priority_than_part_writes():
    """Low-priority owners (a store's merges) run on threads with a higher nice value, in order."""
    import os
    import threading

    from expman.collector._background import LOW_NICE, Background

    nice: dict[str, list[int]] = {"writes": [], "merges": []}

    def job(kind: str):  # noqa: ANN202
        return lambda: nice[kind].append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    background = Background()
    try:
        for _ in range(3):
            background.submit("writes", job("writes"))
            background.submit("merges", job("merges"), low_priority=True)
        assert background.wait("writes", 30) and background.wait("merges", 30)
    finally:
        background.close()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice == {"writes": [base] * 3, "merges": [min(base + LOW_NICE, 19)] * 3}


def test_the_collector_allocates_arrow_memory_from_the_c_heap():
    """Its freed pages go back to the OS after background jobs (malloc_trim); an explicit
    ARROW_DEFAULT_MEMORY_POOL still wins."""
    import os
    import subprocess
    import sys

    code = "import expman.collector, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip() == "system"
    env["ARROW_DEFAULT_MEMORY_POOL"] = "mimalloc"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip() == "mimalloc"


def test_a_merge_lets_each_input_go_once_its_rows_are_taken(tmp_path):
    """A merge of many parts holds the readers of the inputs it is still reading only."""
    import pyarrow as pa

    from expman.collector._parts import STREAM_BATCH, _Stream

    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"x": list(range(STREAM_BATCH + 5))}), path)
    stream = _Stream(pq.ParquetFile(path))
    got = stream.take(STREAM_BATCH)
    assert stream._batches is not None  # rows left: still reading
    got += stream.take(5)
    assert stream._batches is None and stream._head is None
    assert pa.Table.from_batches(got).column("x").to_pylist() == list(range(STREAM_BATCH + 5))
