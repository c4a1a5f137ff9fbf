"""`expman ls` over many finished runs (issue 20: <= 2 s at 10,000 runs).

    python benchmarks/bench_ls.py                    # 10,000 runs of 4 ranks
    python benchmarks/bench_ls.py --runs 1000 --ranks 32

The runs are written as the collector leaves finished runs: run.yaml with the collector's
fields in its order (libyaml's dumper, `sort_keys=False`, as `write_yaml_atomic` writes
it), config.yaml, and an empty metrics folder (`ls` reads no Parquet). Each timing is a
fresh `expman ls` process (imports included, output to a pipe): the median and the
slowest of `--trials`, and the peak RSS. `list_runs()` in a fresh interpreter is the
reference (it reads each run.yaml's start time only). The output's line count is
checked: one header, one line per run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

TARGET_S = 2.0
LIST_RUNS = ("import json, resource, sys, time; t = time.perf_counter(); import expman; "
             "n = len(expman.list_runs(sys.argv[1])); "
             "print(json.dumps({'seconds': time.perf_counter() - t, 'runs': n, "
             "'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")


def run_info(i: int, ranks: int) -> dict:
    """run.yaml of run i as the collector writes it for a finished run of `ranks` ranks on 2 hosts."""
    started = f"2026-11-18T{8 + i // 3600 % 12:02d}:{i // 60 % 60:02d}:{i % 60:02d}.123+00:00"
    ended = "2026-11-18T22:00:00.000+00:00"
    hosts = [f"node{h:02d}" for h in range(min(2, ranks))]
    return {
        "id": f"{i:012x}", "name": f"run{i}", "experiment": f"exp{i % 20}", "status": "finished",
        "started_at": started, "ended_at": ended, "duration_s": 3600.0 + i % 7, "tags": ["bench"],
        "parent": None, "children": [], "world_size": ranks, "hosts": hosts,
        "ranks": {r: {"host": hosts[r % len(hosts)], "pid": 1000 + r, "local_rank": r // len(hosts),
                      "node_rank": r % len(hosts), "status": "finished", "started_at": started, "ended_at": ended,
                      "last_heartbeat": ended, "last_step": 20_000} for r in range(ranks)},
        "launcher": "torchrun", "job": {"id": f"job{i}", "restart": 0},
        "software": {"expman": "0.1.0", "python": "3.11.7", "platform": "Linux-6.1-x86_64-with-glibc2.36",
                     "executable": "/opt/venv/bin/python", "argv": "train.py --lr 0.001", "cwd": "/home/user/proj"},
    }


def write_runs(root: Path, runs: int, ranks: int) -> None:
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    for i in range(runs):
        info = run_info(i, ranks)
        run = root / info["experiment"] / f"run{i}-{info['id']}"
        (run / "metrics").mkdir(parents=True)
        (run / "run.yaml").write_text(yaml.dump(info, Dumper=dumper, sort_keys=False, allow_unicode=True))
        (run / "config.yaml").write_text(yaml.dump({"lr": 0.001, "batch": 32}, Dumper=dumper, sort_keys=False))


def time_ls(root: Path, trials: int, runs: int) -> dict:
    expman = str(Path(c.PYTHON).with_name("expman"))
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        out = subprocess.run([expman, "ls", "--root", str(root)],
                             capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - started)
        if out.returncode != 0:
            raise SystemExit(f"expman ls failed: {out.stderr.strip()[-400:]}")
        lines = out.stdout.splitlines()
        if len(lines) != runs + 1:
            raise SystemExit(f"expman ls printed {len(lines)} lines for {runs} runs")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far: an ls
    return {"median": statistics.median(times), "max": max(times), "peak_mb": peak_mb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--keep", type=Path, help="write the runs here once and reuse them on later calls")
    args = p.parse_args(argv)

    print(f"bench_ls: {args.runs:,} finished runs of {args.ranks} ranks; machine: {c.machine_line()}")
    root = args.keep or c.make_tmpdir("ls")
    try:
        if not any(root.glob("exp*")):
            started = time.perf_counter()
            write_runs(root, args.runs, args.ranks)
            print(f"  wrote the runs in {time.perf_counter() - started:.1f} s")
        ls = time_ls(root, args.trials, args.runs)
        ref = json.loads(subprocess.run([c.PYTHON, "-c", LIST_RUNS, str(root)], capture_output=True, text=True,
                                        check=True, timeout=600).stdout)
        verdict = "ok" if ls["median"] <= TARGET_S else "MISSED"
        print(f"  expman ls            median {ls['median']:.2f} s, slowest {ls['max']:.2f} s of {args.trials}, "
              f"peak RSS {ls['peak_mb']:.0f} MB   target <= {TARGET_S} s: {verdict}")
        print(f"  list_runs() (ref.)   {ref['seconds']:.2f} s in-process, {ref['runs']:,} runs, "
              f"peak RSS {ref['peak_mb']:.0f} MB")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
