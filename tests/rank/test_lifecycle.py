"""How a training script's end shows up in the run: real interpreters, real exit paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import expman
from _helpers import finish_behind_a_stopped_collector, wait_for

PRELUDE = """
import expman, sys, time
exp = expman.start_experiment("e", "script", root={root!r})
print(exp.run_dir, flush=True)
for step in range(1000):
    exp.log_metric("loss", 1.0 / (step + 1), step=step)
"""


def run_dir_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout.splitlines()[0].strip()


def test_script_that_just_ends_is_finished_and_complete(root, run_script):
    result = run_script(PRELUDE.format(root=str(root)), check=True)
    run = expman.open_run(run_dir_of(result))
    assert run.status == "finished"
    assert run.metrics().num_rows == 1000, "interpreter exit flushes and waits for the collector"


def test_uncaught_exception_marks_failed(root, run_script):
    result = run_script(PRELUDE.format(root=str(root)) + "raise RuntimeError('diverged')\n")
    assert result.returncode == 1 and "RuntimeError: diverged" in result.stderr
    run = expman.open_run(run_dir_of(result))
    assert run.status == "failed"
    assert run.info["error"]["type"] == "RuntimeError" and run.info["error"]["message"] == "diverged"
    assert run.metrics().num_rows == 1000


def test_sigterm_marks_killed(root, tmp_path):
    script = tmp_path / "train.py"
    # Short sleeps, as a training loop runs bytecode: the kernel may hand the SIGTERM to a
    # helper thread, and Python runs the handler on the main thread at its next bytecode,
    # which one long time.sleep() would put off until it ends.
    script.write_text(PRELUDE.format(root=str(root)) + "print('ready', flush=True)\n"
                      "for _ in range(600):\n    time.sleep(0.1)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = proc.stdout.readline().strip()
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, stderr
    run = expman.open_run(run_dir)
    assert run.status == "killed", (run.info, stderr)
    assert run.metrics().num_rows == 1000


def test_kill_9_of_the_training_process_marks_crashed(root, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(PRELUDE.format(root=str(root)) + """
while exp.stats()["acked"] < 1000:
    time.sleep(0.01)
print('ready', flush=True)
time.sleep(60)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    run_dir = proc.stdout.readline().strip()
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    wait_for(lambda: expman.open_run(run_dir).status == "crashed", 15, "the local collector to mark the run crashed")
    run = expman.open_run(run_dir)
    assert run.metrics().num_rows == 1000
    assert "exited without finishing" in run.info["ranks"][0]["error"]["message"]


def test_exit_is_bounded_when_the_collector_hangs(root, short_dir, run_script):
    from conftest import start_collector

    c = start_collector(root, short_dir)
    try:
        os.kill(c.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        result = run_script(f"""
            import expman, time
            exp = expman.start_experiment("e", "hang", root={str(root)!r}, collector={c.endpoint!r}, finish_timeout=1.0)
            exp.log_metric("loss", 1.0)
            t = time.monotonic()
            print(exp.finish(), exp.stats()["buffered"], round(time.monotonic() - t, 1))
        """)
        assert time.monotonic() - t0 < 50  # the script's own timeout is 60 s
        assert result.returncode == 0, result.stderr
        confirmed, buffered, waited = result.stdout.split()
        assert confirmed == "False" and int(buffered) == 1 and float(waited) <= 10.0  # 1 s asked; the default is 30
        assert "did not confirm" in result.stderr
    finally:
        os.kill(c.proc.pid, signal.SIGCONT)
        assert c.stop() == 0


def test_local_collector_exits_when_idle_and_comes_back_on_demand(root, monkeypatch):
    from expman._rank import local_collector as _local, start as _api

    monkeypatch.setattr(_local, "IDLE_EXIT_S", 0.5)
    with expman.start_experiment("e", "first", root=root) as exp:
        exp.log_metric("x", 1.0)
    local = _api._local_collectors[(root, None)]
    wait_for(lambda: local._proc.poll() is not None, 10, "the idle local collector to exit")
    assert local._proc.returncode == 0
    exited = local._proc
    time.sleep(1.0)  # the sender saw the connection drop: with nothing to deliver it must not restart one
    assert local._proc is exited, "an idle exit is not a crash: no collector is started for nothing"
    with expman.start_experiment("e", "second", root=root) as again:
        again.log_metric("x", 2.0)
    assert expman.open_run(again.run_dir).metrics()["value"].to_pylist() == [2.0]
    assert expman.open_run(exp.run_dir).status == "finished"


def test_a_local_collector_killed_while_finish_waits_is_started_again(root):
    """finish() waits on the private collector, which dies with the frames queued to it:
    the rank starts a new one and delivers them (no point lost, none twice)."""
    from expman._rank import start as _api

    exp = expman.start_experiment("e", "killed", root=root)
    exp.log_metric("loss", 0.0, step=0)
    wait_for(lambda: exp.stats()["acked"] == 1, 30, "the first point's ack")
    local = _api._local_collectors[(root, None)]
    first = local._proc
    # 90 s: on a loaded machine the last frames can wait for the 30 s fallback resend
    # (docs/architecture.md "Delivery"), which this bounds as a hang, not as a speed
    waiter, result = finish_behind_a_stopped_collector(exp, first.pid, 2000, timeout=90)
    os.kill(first.pid, signal.SIGKILL)
    waiter.join(180)
    assert result == [True]
    assert local._proc is not first
    run = expman.open_run(exp.run_dir)
    assert sorted(run.metrics()["step"].to_pylist()) == list(range(2000))
    assert run.status == "finished"

