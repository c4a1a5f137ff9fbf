"""Spill to the local spool, replay, `expman sync`, and a full disk in the collector.

Real collector processes, stopped (SIGSTOP), killed or refused disk space on purpose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import expman
from _helpers import wait_for
from conftest import start_collector


def _steps(run_dir) -> list[int]:
    return expman.open_run(run_dir).metrics()["step"].to_pylist()


@pytest.mark.parametrize("ring_points", [None, "16"])  # 16: a ring that fills, laps as spilled frames free it
def test_stopped_collector_spills_then_replays_every_point_once_in_order(root, short_dir, spool_dir, ring_points,
                                                                        monkeypatch):
    if ring_points is not None:
        monkeypatch.setenv("EXPMAN_RING_POINTS", ring_points)
    c = start_collector(root, short_dir)
    try:
        exp = expman.start_experiment("e", "spill", root=root, collector=c.endpoint, max_buffer_bytes=64 * 1024,
                                      flush_interval=0.002)
        exp.log_metric("loss", 0.0, step=0)
        wait_for(lambda: exp.stats()["acked"] == 1, 10, "the first ack")
        os.kill(c.proc.pid, signal.SIGSTOP)
        n = 200_000
        t0 = time.perf_counter()
        for step in range(1, n):
            exp.log_metric("loss", float(step), step=step)
            if step % 20_000 == 0:
                time.sleep(0.05)  # let the sender cut many frames
        log_time = time.perf_counter() - t0
        wait_for(lambda: exp.stats()["spilled"] > 0, 10, "frames to spill")
        wait_for(lambda: exp.stats()["buffered"] == n - 1, 10, "everything to be buffered or spilled")
        assert list(spool_dir.glob("*.spool")), "a spool file while the collector is stopped"
        stats = exp.stats()
        assert stats["dropped"] == 0 and stats["acked"] == 1
        if ring_points is not None:
            assert exp._channel.ring.settled > 16  # its slots were freed (spilled, or long sent) with no ack
        os.kill(c.proc.pid, signal.SIGCONT)
        t1 = time.perf_counter()
        assert exp.finish(timeout=30) is True
        replay_s = time.perf_counter() - t1
        steps = _steps(exp.run_dir)
        assert len(steps) == n and sorted(steps) == list(range(n)), "every point exactly once"
        assert steps == sorted(steps), "in order"
        assert exp.stats()["dropped"] == 0
        assert not list(spool_dir.glob("*.spool")), "the spool is gone once everything is confirmed"
        print(f"\nspilled {stats['spilled']} points; logging {n} took {log_time:.2f} s; replay+finish {replay_s:.2f} s")
    finally:
        assert c.stop() == 0, c.log()


def test_script_exits_while_collector_down_then_expman_sync_delivers_everything(root, short_dir, spool_dir, run_script):
    endpoint = f"ipc://{short_dir}/down.sock"
    n = 50_000
    result = run_script(f"""
        import expman
        exp = expman.start_experiment("e", "offline", root={str(root)!r}, collector={endpoint!r},
                                      max_buffer_bytes=32 * 1024, finish_timeout=0.5)
        exp.log_parameters({{"lr": 0.1}})
        for step in range({n}):
            exp.log_metric("loss", float(step), step=step)
        exp.info("logged while nobody listened")
        print(exp.uid, flush=True)
    """, timeout=60, check=True)
    uid = result.stdout.strip()
    assert "expman sync" in result.stderr, result.stderr
    spools = list(spool_dir.glob("*.spool"))
    assert len(spools) == 1
    cli = [sys.executable, "-m", "expman", "sync", "--spool", str(spool_dir)]
    # Nobody listens yet: the file is kept, the command says so.
    down = subprocess.run([*cli, "--collector", endpoint, "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "kept" in down.stdout, down.stdout + down.stderr
    assert spools[0].exists()
    c = start_collector(root, short_dir, endpoint)
    try:
        t0 = time.perf_counter()
        done = subprocess.run([*cli, "--collector", endpoint], capture_output=True, text=True, timeout=90)
        took = time.perf_counter() - t0
        assert done.returncode == 0, done.stdout + done.stderr
        assert not list(spool_dir.glob("*.spool")), "a delivered spool file is deleted"
        run_dir = next(root.glob(f"e/*-{uid}"))
        wait_for(lambda: expman.open_run(run_dir).status == "finished", 10, "the run to be finished")
        steps = _steps(run_dir)
        assert len(steps) == n and sorted(steps) == list(range(n)), "exact point count, no duplicates"
        run = expman.open_run(run_dir)
        assert run.params == {"lr": 0.1}
        assert "logged while nobody listened" in run.log_text()
        # Syncing again finds nothing, and a repeat of the same frames would be dropped as duplicates.
        again = subprocess.run([*cli, "--collector", endpoint], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "0 spool file(s)" in again.stdout
        print(f"\nexpman sync delivered {n} points in {took:.2f} s (including interpreter start)")
    finally:
        assert c.stop() == 0, c.log()


def test_memory_and_spool_full_drops_are_counted_in_stats_and_run_yaml(root, short_dir, spool_dir):
    c = start_collector(root, short_dir)
    try:
        exp = expman.start_experiment("e", "full", root=root, collector=c.endpoint,
                                      max_buffer_bytes=16 * 1024, max_spool_bytes=64 * 1024,
                                      max_points_per_frame=1000)  # frames well under the spool's size
        exp.log_metric("loss", 0.0, step=0)
        wait_for(lambda: exp.stats()["acked"] == 1, 10, "the first ack")
        os.kill(c.proc.pid, signal.SIGSTOP)
        n = 100_000
        for step in range(1, n):
            exp.log_metric("loss", float(step), step=step)
            if step % 10_000 == 0:
                time.sleep(0.02)
        wait_for(lambda: exp.stats()["buffered"] + exp.stats()["dropped"] == n - 1, 10, "all points placed")
        stats = exp.stats()
        assert stats["dropped"] > 0 and stats["spilled"] > 0
        os.kill(c.proc.pid, signal.SIGCONT)
        assert exp.finish(timeout=30) is True
        stats = exp.stats()
        rows = len(_steps(exp.run_dir))
        assert rows + stats["dropped"] == n, "every point is either stored or counted as dropped"
        info = yaml.safe_load((exp.run_dir / "run.yaml").read_text())
        assert info["ranks"][0]["dropped_points"] == stats["dropped"]
        assert info["dropped_points"] == stats["dropped"]
        assert "dropped" in expman.open_run(exp.run_dir).log_text()
    finally:
        assert c.stop() == 0, c.log()


def test_disk_full_collector_stops_acknowledging_then_resumes_without_loss(root, short_dir, tmp_path, monkeypatch):
    fault = tmp_path / "enospc"  # while it exists the collector's WAL writes fail with ENOSPC
    c = start_collector(root, short_dir, program=[sys.executable, str(Path(__file__).resolve().parents[1] / "_enospc_collector.py"), str(fault)])
    try:
        exp = expman.start_experiment("e", "diskfull", root=root, collector=c.endpoint, max_buffer_bytes=32 * 1024, finish_timeout=5)
        for step in range(1000):
            exp.log_metric("loss", float(step), step=step)
        wait_for(lambda: exp.stats()["acked"] == 1000, 10, "acks before the disk fills")
        fault.touch()
        n = 30_000
        for step in range(1000, n):
            exp.log_metric("loss", float(step), step=step)
        wait_for(lambda: "cannot write" in c.log(), 10, "the collector to say why it stops acknowledging")
        time.sleep(1.0)
        stats = exp.stats()
        assert stats["acked"] == 1000, "nothing is acknowledged while it cannot be stored"
        assert stats["spilled"] > 0, "the rank spills meanwhile"
        assert c.proc.poll() is None, "the collector keeps serving"
        fault.unlink()
        t0 = time.perf_counter()
        assert exp.finish(timeout=40) is True
        recovered = time.perf_counter() - t0
        steps = _steps(exp.run_dir)
        assert len(steps) == n and sorted(steps) == list(range(n)), "no loss, no duplicate after the disk is back"
        assert expman.open_run(exp.run_dir).status == "finished"
        wait_for(lambda: "writing works again" in c.log(), 30, "the recovery line")
        print(f"\ndisk full: recovered and finished {recovered:.1f} s after space returned")
    finally:
        assert c.stop() == 0, c.log()
