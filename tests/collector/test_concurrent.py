"""One collector, many concurrent runs (issue 20): every point stored once, every run finished.

Four rank processes each drive 25 runs side by side against one real collector, so the
collector holds 100 open runs at once, each taking small frames (a point or two) from
one of several senders; then every run is read back from its Parquet files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import yaml

import expman

PROCESSES = 4
RUNS_PER_PROCESS = 25
POINTS = 200

_WORKER = textwrap.dedent("""
    import json, sys, time
    import expman

    endpoint, root, tag, runs, points = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    exps = [expman.start_experiment("concurrent", f"{tag}-{i}", root=root, collector=endpoint) for i in range(runs)]
    for step in range(points):
        for i, exp in enumerate(exps):
            exp.log_metric("loss", step + i / 1000, step=step)
        if step % 20 == 0:
            time.sleep(0.01)  # paced, so frames stay small and runs interleave
    print(json.dumps([[exp.finish(), str(exp.run_dir), i] for i, exp in enumerate(exps)]))
""")


def test_a_hundred_concurrent_runs_each_stored_once_and_finished(collector, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), collector.endpoint, str(collector.root), f"p{p}",
                               str(RUNS_PER_PROCESS), str(POINTS)], stdout=subprocess.PIPE, text=True)
             for p in range(PROCESSES)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        results.extend(json.loads(out))
    assert len(results) == PROCESSES * RUNS_PER_PROCESS
    assert [ok for ok, _, _ in results] == [True] * len(results), "every finish() is confirmed"
    for _, run_dir, index in results:
        run = expman.open_run(run_dir)
        assert yaml.safe_load((run.path / "run.yaml").read_text())["status"] == "finished"
        table = run.metrics()
        assert sorted(table.column("step").to_pylist()) == list(range(POINTS)), run_dir
        assert sorted(table.column("value").to_pylist()) == [s + index / 1000 for s in range(POINTS)], run_dir
