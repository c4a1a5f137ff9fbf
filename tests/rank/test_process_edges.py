"""A training process in unusual shapes: forked after it started a run, or on a machine
where someone else took its runtime folder first."""

from __future__ import annotations

import os
import sys

import pytest

import expman


def test_a_forked_child_warns_once_never_hangs_and_can_log_its_own_run(root, run_script):
    result = run_script(f"""
        import os, sys, time, expman
        exp = expman.start_experiment("e", "parent", root={str(root)!r})
        exp.log_metric("loss", 1.0, step=0)
        pid = os.fork()
        if pid == 0:  # the child
            for step in range(1, 100):
                exp.log_metric("loss", 99.0, step=step)   # the parent's run: dropped, said once
            exp.log_parameters({{"from_child": True}})
            t0 = time.monotonic()
            ok = exp.finish()                              # not the child's to finish: at once
            own = expman.start_experiment("e", "child", root={str(root)!r})
            own.log_metric("loss", 2.0, step=0)
            print("CHILD", ok, exp.stats()["dropped"], own.finish(), round(time.monotonic() - t0, 1), flush=True)
            sys.exit(0)                                    # exit hooks: nothing of the parent's to wait for
        _, status = os.waitpid(pid, 0)
        exp.log_metric("loss", 3.0, step=1)
        print("PARENT", os.waitstatus_to_exitcode(status), exp.finish(), flush=True)
        print("RUNS", exp.run_dir, flush=True)
    """, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line}
    ok, dropped, own_ok, seconds = lines["CHILD"]
    assert ok == "False" and own_ok == "True"
    assert int(dropped) == 100  # 99 points and the parameters
    assert float(seconds) < 30, "finish() of an inherited run must not wait for a delivery that never comes"
    assert lines["PARENT"] == ["0", "True"]
    assert result.stderr.count("was started by the process this one was forked from") == 3  # points, params, finish: once each
    parent = expman.open_run(lines["RUNS"][0])
    assert sorted(parent.metrics()["value"].to_pylist()) == [1.0, 3.0]
    assert "from_child" not in parent.params
    [child] = [r for r in expman.list_runs(root) if r.info["name"] == "child"]
    assert child.metrics()["value"].to_pylist() == [2.0] and child.status == "finished"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder that belongs to another user")
def test_a_squatted_runtime_folder_is_skipped_and_local_mode_still_works(root, run_script, short_dir):
    tmp, home = short_dir / "tmp", short_dir / "home"  # short: socket paths live under them
    tmp.mkdir()
    home.mkdir()
    squatted = tmp / f"expman-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)  # as if "nobody" had created it first
    env = {"TMPDIR": str(tmp), "HOME": str(home), "XDG_RUNTIME_DIR": ""}
    result = run_script(f"""
        import expman
        with expman.start_experiment("e", "squat", root={str(root)!r}) as exp:
            exp.log_metric("loss", 1.0, step=0)
        print(exp.run_dir)
    """, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"not using {squatted}" in result.stderr and "belongs to uid 65534" in result.stderr
    run = expman.open_run(result.stdout.strip())
    assert run.status == "finished" and run.metrics()["value"].to_pylist() == [1.0]
    assert not any(squatted.iterdir()), "nothing of ours was put into the other user's folder"
    assert sys.platform.startswith("linux")
