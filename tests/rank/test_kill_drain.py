"""A rank killed with -9 in local mode: what its sender had sent is stored, and the run is
crashed at once, also while the dead rank is a zombie its launcher has not reaped.

The rank logs at a steady rate and keeps writing how many points its sender has sent.
The collector is paused (SIGSTOP) while the rank goes on sending, so frames are waiting in
the socket when the rank dies; only then is the collector let go. What the test asserts
needs no timing: every point counted as sent before the kill (a second before it, so the
rank's ZeroMQ I/O thread has written it to the kernel) is stored, and what is stored is a
contiguous prefix. The ranks ask for a 60 s heartbeat, so missed heartbeats (121 s) cannot
be what marks the run crashed inside the 30 s the test allows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import expman
from _helpers import process_gone, wait_for

RANK = """
import json, os, sys, time
from pathlib import Path
import expman
from expman._rank import start as _api

status = Path(sys.argv[1])
exp = expman.start_experiment("e", "killed", root={root!r}, heartbeat_interval=60)
local = next(iter(_api._local_collectors.values()))
pid = local._proc.pid if local._proc is not None else int((local._dir / "pid").read_text())
print(exp.run_dir, pid, flush=True)
step = sent = 0
while True:
    exp.log_metric("loss", 1.0 / (step + 1), step=step)  # one point per step
    step += 1
    if step % 10 == 0:
        s = exp.stats()
        sent = max(sent, s["sent"])  # a resend takes a frame off "sent" until it goes again
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps({{"returned": step, "sent": sent, "acked": s["acked"]}}))
        os.replace(tmp, status)
    time.sleep(0.001)
"""


def _status(path: Path) -> dict[str, int]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"returned": 0, "sent": 0, "acked": 0}


def _start_rank(script: Path, status: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, int]:
    env = {**{k: v for k, v in os.environ.items() if k != "EXPMAN_COLLECTOR"}, **(env or {})}  # local mode
    proc = subprocess.Popen([sys.executable, str(script), str(status)], stdout=subprocess.PIPE, text=True, env=env)
    run_dir, collector_pid = proc.stdout.readline().split()
    return proc, run_dir, int(collector_pid)


def _kill_while_collector_paused(proc: subprocess.Popen, status: Path, collector_pid: int, reap: bool = False) -> int:
    """Pause the collector, let the rank send ~300 more points, kill -9 the rank (left
    unreaped unless `reap`), let the collector go. Returns the points the rank had sent a
    second before the kill."""
    wait_for(lambda: _status(status)["acked"] >= 100, 60, "the collector to store the first points")
    os.kill(collector_pid, signal.SIGSTOP)
    try:
        acked = _status(status)["acked"]
        wait_for(lambda: _status(status)["sent"] >= acked + 300, 60, "the rank to send to the paused collector")
        sent = _status(status)["sent"]
        time.sleep(1.0)  # the rank's I/O thread writes a sent frame to the socket within microseconds
        proc.kill()  # not reaped until the run is crashed: a zombie, as under a busy launcher
        if reap:
            proc.wait()
    finally:
        os.kill(collector_pid, signal.SIGCONT)
    return sent


def _assert_stored(run: expman.Run, rank: int, sent: int) -> None:
    table = run.metrics(keys=["loss"], ranks=[rank])
    steps = sorted(table.column("step").to_pylist())
    assert steps == list(range(len(steps))), "stored steps are a contiguous prefix, each once"
    assert len(steps) >= sent, f"{sent - len(steps)} points the rank had sent are missing"


@pytest.mark.parametrize("reap", [False, True], ids=["zombie", "reaped"])
def test_kill_9_in_local_mode_stores_what_was_sent_and_crashes_the_run(root, tmp_path, reap):
    script = tmp_path / "rank.py"
    script.write_text(RANK.format(root=str(root)))
    status = tmp_path / "status.json"
    proc, run_dir, collector_pid = _start_rank(script, status)
    try:
        sent = _kill_while_collector_paused(proc, status, collector_pid, reap)
        wait_for(lambda: expman.open_run(run_dir).status == "crashed", 30, "the run to be marked crashed")
        assert reap or process_gone(proc.pid)  # a zombie: not reaped (poll() would reap it) until the run is crashed
        wait_for(lambda: process_gone(collector_pid), 30, "the private collector to exit")
    finally:
        proc.kill()
        proc.wait()
    run = expman.open_run(run_dir)
    assert run.info["ranks"][0]["status"] == "lost"
    assert "exited without finishing" in run.info["ranks"][0]["error"]["message"]
    _assert_stored(run, 0, sent)


def _torchrun_env(rank: int, world: int, job: str) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "TORCHELASTIC_RUN_ID": job}


def test_shared_local_collector_marks_each_killed_rank_at_once(root, tmp_path):
    """Two ranks of one job share a local collector; rank 1 is killed -9 (and left a zombie)
    while rank 0 goes on: rank 1 is lost at once with all it had sent, rank 0 still runs."""
    script = tmp_path / "rank.py"
    script.write_text(RANK.format(root=str(root)))
    job = uuid.uuid4().hex[:12]
    statuses = [tmp_path / "status0.json", tmp_path / "status1.json"]
    procs = []
    try:
        for r in range(2):
            procs.append(_start_rank(script, statuses[r], _torchrun_env(r, 2, job)))
        (rank0, run_dir, collector_pid), (rank1, run_dir1, _) = procs
        assert run_dir1 == run_dir
        wait_for(lambda: _status(statuses[0])["acked"] >= 100, 60, "rank 0's first points stored")
        sent = _kill_while_collector_paused(rank1, statuses[1], collector_pid)
        wait_for(lambda: expman.open_run(run_dir).info["ranks"].get(1, {}).get("status") == "lost", 30,
                 "rank 1 to be marked lost")
        run = expman.open_run(run_dir)
        assert "exited without finishing" in run.info["ranks"][1]["error"]["message"]
        assert run.info["ranks"][0]["status"] == "running" and run.status == "running"
        _assert_stored(run, 1, sent)
        rank0.kill()
        wait_for(lambda: expman.open_run(run_dir).status == "crashed", 30, "the run to be crashed")
    finally:
        for proc, _, _ in procs:
            proc.kill()
            proc.wait()
        if procs:
            os.kill(procs[0][2], signal.SIGTERM)  # the job's collector would leave by itself 30 s after its runs
            wait_for(lambda: process_gone(procs[0][2]), 30, "the shared collector to exit")
