"""What a run costs the collector between its frames (issue 20, docs/architecture.md "Scaling"):
run.yaml goes with the group commit of the turn that changed it and only when its text
changed, a new run's folder is durable before its hello is acknowledged, and a short run
ends with one part and no merge."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

import expman
from expman._storage.layout import RUN_YAML, read_yaml
from expman._storage.wal import SegmentWriter
from expman._wire import frames as proto
from expman._wire.columns import metrics_body
from expman.collector import _runs
from expman.collector._commit import GroupCommit
from expman.collector._metrics_store import MetricsStore
from expman.collector._runs import Run
from expman.collector._server import over_budget

from _helpers import wait_for
from conftest import start_collector


def _hello(uid: str, name: str = "r", rank: int = 0) -> proto.Frame:
    return proto.Frame(proto.HELLO, uid, "h", rank, f"sender-{uid}", 1, time.time(),
                       {"experiment": "e", "name": name, "world_size": 1, "pid": 1})


def _new_run(root: Path, uid: str) -> Run:
    frame = _hello(uid)
    run = Run.from_hello(root, frame, "writer")
    run.hello(frame)
    return run


def test_run_yaml_is_rewritten_only_when_its_text_changes(tmp_path):
    run = _new_run(tmp_path, "u1")
    run.sync()
    path = run.dir / RUN_YAML
    first = path.stat().st_ino  # each write renames a new file over it
    run.touch(force=True)  # said to have changed, but says the same
    run.sync()
    assert path.stat().st_ino == first
    run.heartbeat(_hello("u1"))  # a newer heartbeat: unforced, waits for the interval
    run.sync()
    assert path.stat().st_ino == first
    assert run.info_due(time.monotonic() + _runs.RUN_YAML_MIN_INTERVAL_S)
    run.sync()
    assert path.stat().st_ino != first
    assert read_yaml(path)["ranks"][0]["last_heartbeat"] == run.info["ranks"][0]["last_heartbeat"]


def test_a_new_runs_yaml_is_in_the_commit_that_acknowledges_its_hello(tmp_path, monkeypatch):
    """Many runs: one syncfs covers every new run.yaml (written, renamed into place, not
    fsynced one by one); a failed commit fails them all, so no hello is acknowledged."""
    if SegmentWriter.sync_filesystem is None:
        return  # no syncfs here: each run is fsynced on its own (next test)
    seen: list[dict[str, str]] = []
    fail = False

    def syncfs(fd: int) -> None:
        seen.append({p.parent.name: read_yaml(p)["status"] for p in tmp_path.glob(f"e/*/{RUN_YAML}")})
        if fail:
            raise OSError(5, "injected")

    fsyncs: list[int] = []
    monkeypatch.setattr(SegmentWriter, "sync_filesystem", staticmethod(syncfs))
    monkeypatch.setattr(_runs.os, "fsync", lambda fd: fsyncs.append(fd))
    commit = GroupCommit(tmp_path)
    runs = {_new_run(tmp_path, f"u{i}") for i in range(3)}
    assert not list(tmp_path.glob(f"e/*/{RUN_YAML}")), "nothing written before the commit"
    assert commit.sync(runs) == []
    assert seen == [{run.dir.name: "running" for run in runs}]
    assert fsyncs == [], "the group commit's syncfs makes them durable, no fsync each"
    fail = True
    for run in runs:
        run.info["status"] = "finished"
        run.touch(force=True)
    assert {run for run, _ in commit.sync(runs)} == runs
    commit.close()


def test_a_lone_new_run_fsyncs_its_yaml_and_the_folders_its_hello_made(tmp_path, monkeypatch):
    synced: list[Path] = []
    monkeypatch.setattr(_runs, "fsync_dir", lambda path: synced.append(path))
    run = _new_run(tmp_path, "u1")
    assert GroupCommit(tmp_path).sync({run}) == []
    assert read_yaml(run.dir / RUN_YAML)["id"] == "u1"
    assert {tmp_path, tmp_path / "e", run.dir} <= set(synced)
    synced.clear()
    run.touch(force=True)
    run.sync()
    assert synced == [], "nothing changed, nothing written"


def test_a_collector_killed_right_after_a_hello_leaves_a_readable_run(root, short_dir):
    collector = start_collector(root, short_dir)
    try:
        exp = expman.start_experiment("crash", "after-hello", root=root, collector=collector.endpoint)
        run_dir = Path(exp.run_dir)  # known once the hello is acknowledged
        collector.proc.send_signal(signal.SIGKILL)
        collector.proc.wait(30)
        info = yaml.safe_load((run_dir / RUN_YAML).read_text())
        assert info["id"] == exp.uid and info["status"] == "running"
        assert expman.open_run(run_dir).info["name"] == "after-hello"
        exp.finish(timeout=0.1)
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
            collector.proc.wait(30)


def test_a_short_run_finishes_with_one_part_and_no_merge(collector, root):
    exp = expman.start_experiment("short", "one-part", root=root, collector=collector.endpoint)
    for step in range(2000):
        exp.log_metric("loss", float(step), step=step)
        if step % 100 == 0:
            time.sleep(0.01)  # many frames, over many turns
    assert exp.finish()
    run_dir = Path(exp.run_dir)
    parts = sorted((run_dir / "metrics").glob("*.parquet"))
    assert [(p.name.split("-")[1], pq.read_metadata(p).num_rows) for p in parts] == [("0", 2000)]
    wait_for(lambda: not (run_dir / ".wal").exists(), 30, "the WAL folder to go")


def test_committed_small_frames_are_packed_and_a_failed_commit_drops_only_its_own(tmp_path):
    store = MetricsStore(tmp_path / "run", "w")

    def add(seq: int) -> None:
        body = metrics_body({0: "loss"}, np.zeros(2, np.int32).tobytes(), np.full(2, float(seq)).tobytes(),
                            np.array([2 * seq, 2 * seq + 1], np.int64).tobytes(), None, None)
        data = proto.encode_frame(proto.METRICS, run="u", host="h", rank=0, sender="s", seq=seq,
                                  sent_at=1_700_000_000.0 + seq, body=body)
        store.add_frame(data, proto.decode_frame(data))

    for seq in range(5):
        add(seq)
        store.sync()  # committed: packed
    add(5)
    store.sync(fsync=False)
    store.commit_failed()  # frame 5 was never durable: its resend is stored, not this copy
    assert (store.pending_rows, store.pending_frames) == (10, 5)
    store.flush()
    store.close()
    table = pq.read_table(next((tmp_path / "run" / "metrics").glob("*.parquet")))
    assert sorted(table.column("step").to_pylist()) == list(range(10))
    assert store.stored_frames == {"s": [[0, 4]]}


def test_runs_past_the_memory_budget_flush_largest_first_down_to_half():
    assert over_budget({"a": 10, "b": 20}, 100) == []
    assert over_budget({"a": 10, "b": 60, "c": 40, "d": 5}, 100) == ["b", "c"]  # 115 -> 55 -> 15
    assert over_budget({"a": 30, "b": 30, "c": 30, "d": 30}, 100) == ["a", "b", "c"]  # 120 -> 30
