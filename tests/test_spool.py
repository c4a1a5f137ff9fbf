"""Spill to the local spool, replay, `expman sync`, and a full disk in the collector.

Real collector processes, stopped (SIGSTOP), killed or refused disk space on purpose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import yaml

import expman
from _helpers import wait_for
from conftest import start_collector


def _steps(run_dir) -> list[int]:
    return expman.open_run(run_dir).metrics()["step"].to_pylist()


def test_stopped_collector_spills_then_replays_every_point_once_in_order(root, short_dir, spool_dir):
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
        assert c.stop() == 0
