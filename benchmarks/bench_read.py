"""Reading a big finished run back: one key, the mean across ranks, all keys (issue 20, item 2).

    python benchmarks/bench_read.py                     # 20 M points, 10 keys x 8 ranks
    python benchmarks/bench_read.py --points 5000000    # quicker

The run is written as the collector leaves a finished run, with the collector's own code:
level-0 parts of 1 M points in arrival order (every rank logs every key each step) through
`write_part(..., by_key=True)`, then merged into one part (`merge_parts`, chart summary and
key index in the footer). Each read runs in a fresh interpreter, after a one-row read that
pays the process's fixed costs (imports, thread pools, codecs): the median time of
`--trials` reads, the peak RSS (VmHWM) of the first, and that peak above the RSS before
it, per returned row. DuckDB's per-key count and mean over the same files is the
reference. Targets (20 M points): one key <= 0.3 s, mean across ranks <= 0.5 s, all keys <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

READS = {
    "one key": "run.metrics(keys=['k0'])",
    "one key, 2 ranks, 10% of steps": "run.metrics(keys=['k0'], ranks=[0, 1], steps=(0, LAST // 10))",
    "mean across ranks (one key)": "run.metrics(keys=['k0'], reduce='mean')",
    "mean across ranks (all keys)": "run.metrics(reduce='mean')",
    "all keys": "run.metrics()",
    "all keys, streamed (iter_metrics)": "sum(b.num_rows for b in run.iter_metrics())",
    "duckdb: count and mean per key": "DUCKDB",
}
TARGETS = {"one key": ("s", 0.3), "mean across ranks (one key)": ("s", 0.5), "all keys": ("MB", 1000)}


def write_run(root: Path, points: int, keys: int, ranks: int) -> Path:

    from expman._storage.layout import Part, metrics_schema, part_name, write_yaml_atomic
    from expman.collector._metrics_store import _ENCODING
    from expman.collector._parts import merge_parts, write_part

    run = root / "bench" / "read-00000001"
    (run / "metrics").mkdir(parents=True)
    schema = metrics_schema()
    pieces = []
    tables = c.synthetic_points(points, [f"k{i}" for i in range(keys)], ranks, lambda i, step: (i // keys // 64) * 2000)
    for n, table in enumerate(tables):
        path = run / "metrics" / part_name(0, n, n, "bench")
        write_part(table, path, schema, by_key=True, **_ENCODING)
        pieces.append(Part("bench", n, n, 0, path))
    merge_parts(pieces, 3, schema, summarize=True, by_key=True, **_ENCODING)  # what finish() leaves
    write_yaml_atomic(run / "run.yaml", {
        "id": "00000001", "name": "read", "experiment": "bench", "status": "finished",
        "world_size": ranks, "hosts": ["node01"], "started_at": "2026-11-18T08:26:40+00:00"})
    return run


def child(run: str, expression: str, trials: int, last: int) -> None:
    """One read, `trials` times, in this fresh interpreter; prints JSON."""
    import expman

    opened = expman.open_run(run)
    opened.metrics(steps=(0, 0))  # imports, footer, thread pools, codecs: a process's fixed costs
    base = _status("VmRSS")
    times, rows, peak = [], 0, 0.0
    for trial in range(trials):
        started = time.perf_counter()
        if expression == "DUCKDB":
            import duckdb

            out = duckdb.sql(f"select key, count(*), avg(value) from read_parquet('{run}/metrics/*.parquet') "
                             "group by key").fetchall()
            rows = len(out)
        else:
            out = eval(expression, {"run": opened, "LAST": last})
            rows = out if isinstance(out, int) else out.num_rows
        times.append(time.perf_counter() - started)
        if trial == 0:
            peak = _status("VmHWM")  # one read's peak (later reads may land on memory the allocator kept)
        del out
    print(json.dumps({"seconds": statistics.median(times), "rows": rows, "base_mb": base,
                      "peak_mb": peak}))


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=20_000_000)
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--keep", type=Path, help="write the run here once and reuse it on later calls")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return 0

    print(f"bench_read: {args.points:,} points, {args.keys} keys x {args.ranks} ranks; machine: {c.machine_line()}")
    root = args.keep or c.make_tmpdir("read")
    run = root / "bench" / "read-00000001"
    try:
        if not (run / "run.yaml").exists():
            started = time.perf_counter()
            shutil.rmtree(root / "bench", ignore_errors=True)
            write_run(root, args.points, args.keys, args.ranks)
            print(f"  wrote the run in {time.perf_counter() - started:.1f} s "
                  f"({sum(f.stat().st_size for f in (run / 'metrics').iterdir()) / 1e6:.0f} MB on disk)")
        last = args.points // (args.keys * args.ranks)
        print(f"  {'read':36} {'rows':>12} {'time s':>8} {'peak RSS MB':>12} {'B/row over base':>16}  target")
        for name, expression in READS.items():
            result = subprocess.run([c.PYTHON, __file__, "--child", str(run), expression, str(args.trials), str(last)],
                                    capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                print(f"  {name:36} failed: {result.stderr.strip()[-400:]}")
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            per_row = (r["peak_mb"] - r["base_mb"]) * 1024 * 1024 / max(r["rows"], 1)
            unit, bound = TARGETS.get(name, ("", None))
            value = r["seconds"] if unit == "s" else r["peak_mb"]
            target = "" if bound is None else f"<= {bound} {unit}: {'ok' if value <= bound else 'MISSED'}"
            print(f"  {name:36} {r['rows']:>12,} {r['seconds']:>8.3f} {r['peak_mb']:>12.0f} {per_row:>16.1f}  {target}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
