"""Each rank's stdout and stderr land in its run, with the rank on every line, and still
reach the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import expman

SCRIPT = textwrap.dedent("""
    import sys, expman
    with expman.start_experiment("e", "console", root=sys.argv[1]) as exp:
        print(f"hello from rank {exp.rank}")
        print("two\\nlines", flush=True)
        print(f"a warning on rank {exp.rank}", file=sys.stderr)
        sys.stdout.write("no newline at the end")
        exp.log_metric("x", 1.0)
    print("after the run: not captured")
""")


def run_ranks(tmp_path, root, extra_env=None):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    procs = []
    for rank in range(2):
        env = {**os.environ, "EXPMAN_RUN_ID": "console-job", "EXPMAN_RANK": str(rank), "EXPMAN_WORLD_SIZE": "2",
               **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, str(script), str(root)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs, expman.open_run("console-job", root=root)


def test_both_ranks_stdout_and_stderr_are_in_the_run_and_on_the_terminal(tmp_path, root):
    outs, run = run_ranks(tmp_path, root)
    for rank, (stdout, stderr) in enumerate(outs):
        assert f"hello from rank {rank}\ntwo\nlines\n" in stdout and "after the run" in stdout
        assert f"a warning on rank {rank}" in stderr
    table = run.console()
    assert table.column_names == ["time", "host", "rank", "stream", "line"]
    rows = {(r["rank"], r["stream"], r["line"]) for r in table.to_pylist()}
    for rank in range(2):
        assert {(rank, "stdout", f"hello from rank {rank}"), (rank, "stdout", "two"), (rank, "stdout", "lines"),
                (rank, "stderr", f"a warning on rank {rank}"), (rank, "stdout", "no newline at the end")} <= rows
    assert not any("after the run" in line for _, _, line in rows)
    assert "STDOUT hello from rank 0" in run.log_text()


def test_capture_is_off_with_the_environment_switch(tmp_path, root):
    outs, run = run_ranks(tmp_path, root, {"EXPMAN_CONSOLE": "off"})
    assert "hello from rank 0" in outs[0][0]
    assert run.console().num_rows == 0
    assert run.metrics().num_rows == 2


def test_capture_console_false_leaves_the_streams_alone(root):
    before = sys.stdout
    with expman.start_experiment("e", "quiet", root=root, capture_console=False) as exp:
        assert sys.stdout is before
        print("not captured")
    assert expman.open_run(exp.run_dir).console().num_rows == 0
