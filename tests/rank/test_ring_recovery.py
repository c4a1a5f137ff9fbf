"""Points a `log_metric` call accepted survive the rank's kill -9 (issue 18 item 2): the
host's collector stores them from the rank's point ring in shared memory.

Each rank process logs flat out and kills itself with SIGKILL the instant its last
`log_metric` returned, so points are still in its list, in its sender's frames and in
its ZeroMQ queue: only the ring can bring them back. Every returned point must be in the
run, none twice. Nothing here is timed; waits are generous bounds against hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

import expman
from _helpers import process_gone, wait_for
from expman._storage.ring import DEFAULT_POINTS, HAS_STEP, HAS_TIME, SLOT_BYTES, WRITTEN, PointRing, read_ring
from conftest import start_collector

N = 20_000

RANK = """
import os, sys, time
import expman
from expman._rank import start as _api

collector = sys.argv[2] or None
exp = expman.start_experiment("e", "killed", root=sys.argv[1], collector=collector, heartbeat_interval=float(sys.argv[3]))
pid = 0
for local in _api._local_collectors.values():
    pid = local._proc.pid if local._proc is not None else int((local._dir / "pid").read_text())
print(exp.run_dir, pid, flush=True)
log = exp.log_metric
log("loss", 0.0, step=0)
while exp.stats()["acked"] < 1:  # the collector knows the run (a rank dead before its hello is not one it can name)
    time.sleep(0.01)
for step in range(1, {n}):
    log("loss", step * 0.5, step=step)
log("nostep", 1.5)
log("timed", 2.0, step=1, timestamp=1700000000.25)
exp.log_metrics({{"a": 1, "b": 2.5}}, step=3)
if sys.argv[4] == "acked":  # wait until the collector stored everything: the ring must add nothing
    while exp.stats()["acked"] < {n} + 4:
        time.sleep(0.01)
os.kill(os.getpid(), 9)
""".format(n=N)


@pytest.fixture(autouse=True)
def ring_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's rings in a folder of its own (ranks and collectors it starts inherit it)."""
    path = tmp_path / "rings"
    monkeypatch.setenv("EXPMAN_RING_DIR", str(path))
    return path


def _kill_self(tmp_path: Path, root: Path, endpoint: str = "", heartbeat: float = 60.0, mode: str = "now") -> tuple[Path, int]:
    """Run the rank to its own SIGKILL; its run folder and private collector pid (0: none)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {k: v for k, v in os.environ.items() if k != "EXPMAN_COLLECTOR"}
    proc = subprocess.Popen([sys.executable, str(script), str(root), endpoint, str(heartbeat), mode],
                            stdout=subprocess.PIPE, text=True, env=env)
    run_dir, collector_pid = proc.stdout.readline().split()
    assert proc.wait(120) == -signal.SIGKILL
    return Path(run_dir), int(collector_pid)


def _crashed(run_dir: Path) -> bool:
    try:
        return yaml.safe_load((run_dir / "run.yaml").read_text()).get("status") == "crashed"
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def _check_every_point(run_dir: Path) -> None:
    run = expman.open_run(run_dir)
    steps = run.metrics(keys=["loss"], columns=["step"]).column("step").to_pylist()
    assert len(steps) == N, f"{len(steps)} loss points stored of {N} returned"
    assert sorted(steps) == list(range(N))
    rest = run.metrics(keys=["nostep", "timed", "a", "b"]).to_pylist()
    got = sorted((r["key"], r["value"], r["step"]) for r in rest)
    assert got == [("a", 1.0, 3), ("b", 2.5, 3), ("nostep", 1.5, None), ("timed", 2.0, 1)]
    timed = next(r for r in rest if r["key"] == "timed")
    assert timed["time"].timestamp() == 1700000000.25


def test_local_mode_kill_right_after_the_last_call_loses_nothing(tmp_path: Path, root: Path, ring_dir: Path) -> None:
    run_dir, collector_pid = _kill_self(tmp_path, root)
    wait_for(lambda: process_gone(collector_pid), 120, "the private collector to store the ring and exit")
    assert _crashed(run_dir)
    _check_every_point(run_dir)
    assert list(ring_dir.glob("*.ring")) == []  # stored, then deleted


def test_service_collector_stores_a_dead_ranks_ring(tmp_path: Path, root: Path, short_dir: Path,
                                                    ring_dir: Path) -> None:
    collector = start_collector(root, short_dir)
    try:
        run_dir, _ = _kill_self(tmp_path, root, collector.endpoint, heartbeat=0.5)  # lost after 2 s of silence
        wait_for(lambda: _crashed(run_dir), 120, "the run to be marked crashed")
        wait_for(lambda: not list(ring_dir.glob("*.ring")), 60, "the ring to be stored and deleted")
    finally:
        assert collector.stop() == 0, collector.log()
    _check_every_point(run_dir)


def test_a_ring_whose_points_were_all_stored_adds_nothing(tmp_path: Path, root: Path, ring_dir: Path) -> None:
    run_dir, collector_pid = _kill_self(tmp_path, root, mode="acked")
    wait_for(lambda: process_gone(collector_pid), 120, "the private collector to exit")
    assert _crashed(run_dir)
    _check_every_point(run_dir)


# --- the ring's contract, without processes ------------------------------------------------

def _ring(monkeypatch: pytest.MonkeyPatch, capacity: int) -> PointRing:
    monkeypatch.setenv("EXPMAN_RING_POINTS", str(capacity))
    ring = PointRing.create("s" * 32, "run1", 0, "host")
    assert ring is not None
    ring.name(0, "loss")
    return ring


def _write(ring: PointRing, first: int, last: int) -> None:
    for n in range(first, last):  # as the hot path does: value, step, then the key id; then the count
        assert ring.n == n
        i = ring.slot
        if i < ring.stop:
            ring.values[i] = n * 0.5
            ring.steps[i] = n
            ring.keys[i] = 0
            ring.slot = i + 1
        else:  # a lap's end
            assert ring.put(0, n * 0.5, n, None)


def test_the_ring_gives_back_what_no_stored_frame_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = _ring(monkeypatch, 16)
    _write(ring, 0, 10)
    ring.framed(5, 4, 100.0)  # points 0..3, stored
    ring.framed(6, 8, 101.0)  # points 4..7, never stored
    found = read_ring(ring.path, lambda sender, seq: seq == 5)
    ring.remove()
    assert (found.sender, found.run, found.rank, found.host, found.end) == ("s" * 32, "run1", 0, "host", 10)
    assert [(seq, [p[3] for p in points]) for seq, _t, points in found.frames] == [(6, [4, 5, 6, 7]), (None, [8, 9])]
    assert found.frames[0][1] == 101.0 and found.lost == 0


def test_a_slot_is_written_again_only_once_its_point_is_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = _ring(monkeypatch, 16)
    _write(ring, 0, 16)
    assert not ring.put(0, 1.0, None, None) and ring.n == 16  # full: the caller keeps the point in its list
    ring.framed(1, 8, 0.0)
    ring.framed(2, 16, 0.0)
    ring.settle(8)  # frame 1 stored: its slots are free
    ring.stop = ring.capacity  # as the sender reopens it (RunChannel.open_ring)
    _write(ring, 16, 24)
    assert not ring.put(0, 1.0, None, None)
    found = read_ring(ring.path, lambda sender, seq: seq == 1)
    ring.remove()
    assert [(seq, [p[3] for p in points]) for seq, _t, points in found.frames] == [(2, list(range(8, 16))),
                                                                                   (None, list(range(16, 24)))]
    assert found.end == 24 and found.lost == 0


def test_a_write_cut_by_the_kill_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = _ring(monkeypatch, 16)
    _write(ring, 0, 4)
    ring.values[4] = 2.0  # point 4's value and step, but not yet its key id: the call never returned
    ring.steps[4] = 4
    found = read_ring(ring.path, lambda sender, seq: False)
    ring.remove()
    assert [p[3] for p in found.frames[0][2]] == [0, 1, 2, 3] and found.end == 4


def test_points_of_the_general_write_keep_their_missing_step_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = _ring(monkeypatch, 16)
    assert ring.put(0, 1.5, None, None) and ring.put(0, 10**400, 3, 1700000000.25)
    ids, values, steps, times = ring.columns(0, 2)
    found = read_ring(ring.path, lambda sender, seq: False)
    ring.remove()
    assert steps == [None, 3] and times == [None, 1700000000.25] and len(ids) == 8
    assert [p[1:] for p in found.frames[0][2]] == [(WRITTEN, 1.5, 0, 0.0),
                                                   (WRITTEN | HAS_STEP | HAS_TIME, float("inf"), 3, 1700000000.25)]


def test_a_process_that_exits_with_points_unconfirmed_leaves_them_in_the_spool_not_a_ring(
        run_script: Callable[..., subprocess.CompletedProcess], short_dir: Path, ring_dir: Path, spool_dir: Path) -> None:
    result = run_script(f"""
        import expman
        exp = expman.start_experiment("e", "r", root={str(short_dir / "runs")!r}, collector="ipc://{short_dir}/none.sock",
                                      finish_timeout=0.5)
        for step in range(100):
            exp.log_metric("loss", 1.0, step=step)
        print(len(list(__import__("pathlib").Path({str(ring_dir)!r}).glob("*.ring"))))
    """, check=True)
    assert result.stdout.split() == ["1"]  # the ring existed while the run was open
    assert list(ring_dir.iterdir()) == []
    assert list(spool_dir.glob("*.spool"))


def test_a_ring_goes_to_the_next_folder_when_the_first_lacks_room(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from expman._storage import ring as ring_module

    first, second = tmp_path / "shm", tmp_path / "disk"
    monkeypatch.setattr(ring_module, "ring_dirs", lambda: [first, second])
    monkeypatch.setattr(ring_module, "SHM_SPARE_BYTES", 1 << 62)  # no filesystem has this much to spare
    monkeypatch.setenv("EXPMAN_RING_POINTS", "16")
    ring = PointRing.create("s" * 32, "run1", 0, "host")
    assert ring is not None and ring.path.parent == second
    ring.remove()


def test_a_small_ring_laps_and_spills_into_the_list_without_losing_or_reordering(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPMAN_RING_POINTS", "16")  # laps every 16 points, and is often full
    logged = 0
    with expman.start_experiment("e", "laps", root=root) as exp:
        for step in range(3000):
            exp.log_metric("loss", step * 0.5, step=step)
            logged += 1
            if step % 7 == 0:
                exp.log_metrics({"a": step, "b": step + 0.5}, step=step)
                logged += 2
            if step % 101 == 0:
                exp.log_metric("nostep", float(step))
                logged += 1
            if step % 100 == 99:  # let the collector store them: the ring's slots come free and it opens again
                wait_for(lambda: exp.stats()["acked"] >= logged, 60, "the points so far to be stored")
        assert exp._channel.ring.settled > 160  # its 16 slots were freed and written again and again
    run = expman.open_run(exp.run_dir)
    table = run.metrics().to_pylist()
    loss = [r["step"] for r in table if r["key"] == "loss"]
    assert sorted(loss) == list(range(3000)) and len(loss) == 3000
    assert sorted(r["step"] for r in table if r["key"] == "a") == list(range(0, 3000, 7))
    assert sorted(r["value"] for r in table if r["key"] == "nostep") == [float(s) for s in range(0, 3000, 101)]
    assert all(r["step"] is None for r in table if r["key"] == "nostep")


def test_a_ring_leaves_shared_memory_when_the_machine_is_short_of_memory(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from expman._storage import ring as ring_module

    first, second = tmp_path / "shm", tmp_path / "disk"
    monkeypatch.setattr(ring_module, "ring_dirs", lambda: [first, second])
    monkeypatch.setattr(ring_module, "_memory_available", lambda: 64 << 20)  # the folder has room, the RAM not
    monkeypatch.setenv("EXPMAN_RING_POINTS", "16")
    ring = PointRing.create("s" * 32, "run1", 0, "host")
    assert ring is not None and ring.path.parent == second
    ring.remove()


@pytest.mark.parametrize("slots", ["1024", "131072"])  # laps and fills; or mapped as the threads reach its end
def test_threads_logging_into_one_run_never_share_a_slot(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                         slots: str) -> None:
    import threading

    monkeypatch.setenv("EXPMAN_RING_POINTS", slots)
    per_thread = 20_000
    with expman.start_experiment("e", "threads", root=root) as exp:
        def log(key: str) -> None:
            for step in range(per_thread):
                exp.log_metric(key, float(step), step=step)
                if step % 1000 == 0:
                    exp.log_metrics({f"{key}.a": step, f"{key}.b": float(step)}, step=step)

        threads = [threading.Thread(target=log, args=(f"t{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    table = expman.open_run(exp.run_dir).metrics().to_pylist()
    for i in range(4):
        steps = sorted(r["step"] for r in table if r["key"] == f"t{i}")
        assert steps == list(range(per_thread)), f"thread {i}: {len(steps)} points"
        assert all(r["value"] == float(r["step"]) for r in table if r["key"] == f"t{i}")
        assert sorted(r["step"] for r in table if r["key"] == f"t{i}.a") == list(range(0, per_thread, 1000))


def test_a_ring_whose_acks_lag_frees_the_slots_of_frames_long_sent(root: Path, short_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import signal as signals
    import time

    monkeypatch.setenv("EXPMAN_RING_POINTS", "1024")
    collector = start_collector(root, short_dir)
    try:
        exp = expman.start_experiment("e", "lagging", root=root, collector=collector.endpoint)
        exp.log_metric("loss", 0.0, step=0)
        wait_for(lambda: exp.stats()["acked"] == 1, 60, "the first ack")
        os.kill(collector.proc.pid, signals.SIGSTOP)  # no acks from here on
        try:
            for step in range(1, 5000):
                exp.log_metric("loss", float(step), step=step)
                if step % 500 == 0:  # the sender frames and sends them; 50 ms later their slots may go
                    time.sleep(0.1)
            assert exp._channel.ring.settled > 2048  # slots freed twice over with nothing acknowledged
        finally:
            os.kill(collector.proc.pid, signals.SIGCONT)
        assert exp.finish(timeout=60)
        steps = expman.open_run(exp.run_dir).metrics(keys=["loss"], columns=["step"]).column("step").to_pylist()
        assert sorted(steps) == list(range(5000))
    finally:
        assert collector.stop() == 0, collector.log()


# --- memory: a ring holds what it was written, not its capacity ------------------------------

def _held(ring: PointRing) -> int:
    return os.stat(ring.path).st_blocks * 512


def test_a_new_ring_holds_a_few_pages_and_grows_as_points_are_written(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = _ring(monkeypatch, DEFAULT_POINTS)
    try:
        idle = _held(ring)
        assert idle < 128 << 10, f"a new ring holds {idle} bytes"  # not the 8.4 MiB the whole file would
        _write(ring, 0, 20_000)  # no sender here: put maps more each time the writer reaches the end
        assert ring.ready >= 20_000 and _held(ring) >= 20_000 * SLOT_BYTES
        assert _held(ring) < idle + 20_000 * SLOT_BYTES + (256 << 10)
        assert ring.grow(ring.capacity) and ring.stop == ring.ready == ring.capacity  # as the sender maps ahead
        assert _held(ring) >= ring.capacity * SLOT_BYTES
    finally:
        ring.remove()


def test_slots_past_the_mapped_ones_are_never_read_as_points(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = _ring(monkeypatch, 1 << 14)
    try:
        assert ring.ready < ring.capacity  # the rest reads as zeros: key id 0, "loss", were it read
        _write(ring, 0, 10)
        found = read_ring(ring.path, lambda sender, seq: False)
        assert found.end == 10 and [p[3] for p in found.frames[0][2]] == list(range(10)) and found.lost == 0
        end = ring.ready + 5
        _write(ring, 10, end)
        found = read_ring(ring.path, lambda sender, seq: False)
        assert found.end == end and [p[3] for p in found.frames[0][2]] == list(range(end)) and found.lost == 0
    finally:
        ring.remove()


def test_a_ring_that_cannot_map_more_keeps_what_it_has(monkeypatch: pytest.MonkeyPatch) -> None:
    from expman._storage import ring as ring_module

    ring = _ring(monkeypatch, 1 << 14)
    try:
        _write(ring, 0, ring.ready)
        monkeypatch.setattr(ring_module, "_map_writable", lambda *args: False)  # a full filesystem
        assert not ring.put(0, 1.0, 5, None) and ring.n == ring.ready  # the caller keeps the point in its list
        ring.framed(1, 100, 0.0)  # the table's first page is not mapped yet: the ring stops keeping points
        assert ring.stop == ring.ready == -1 and ring.settled == 100
        found = read_ring(ring.path, lambda sender, seq: False)
        assert found.frames == [] and found.lost == 0
    finally:
        ring.remove()


def test_without_the_kernels_advice_the_whole_ring_is_reserved_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from expman._storage import ring as ring_module

    monkeypatch.setattr(ring_module, "_map_writable", lambda *args: False)  # Linux before 5.14
    ring = _ring(monkeypatch, 1 << 14)
    try:
        assert ring.ready == ring.stop == ring.capacity and _held(ring) >= ring.capacity * SLOT_BYTES
        _write(ring, 0, 5000)
        ring.framed(1, 4000, 0.0)
        found = read_ring(ring.path, lambda sender, seq: False)
        assert [(seq, len(points)) for seq, _t, points in found.frames] == [(1, 4000), (None, 1000)]
    finally:
        ring.remove()
