"""End to end: one rank logs N points as fast as it can, finish(), read them back.

Two loops, each in a fresh interpreter with its own private (local-mode) collector:
  metric   `exp.log_metric("loss", v, step=i)` N times
  metrics  `exp.log_metrics({8 keys}, step=i)` N/8 times
Reported: points/s = N / (first log call -> finish() returned), the logging loop alone,
finish() alone, the collector's peak RSS (sampled every 20 ms from a thread, and its
VmHWM just before finish() and after it), CPU seconds used by rank and collector, and a
check that `expman.open_run(exp.run_dir).metrics()` has exactly N rows.

    python benchmarks/bench_end_to_end.py --points 2000000
    python benchmarks/bench_end_to_end.py --mode metric
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

MODES = {"metric": "log_metric loop", "metrics": "log_metrics, 8 keys per step"}
KEYS = 8


def run_mode(mode: str, points: int) -> dict[str, Any]:

    import expman

    tmp = c.make_tmpdir(f"e2e-{mode}")
    out: dict[str, Any] = {"mode": mode, "label": MODES[mode], "points": points}
    try:
        t_start = time.perf_counter()
        exp = expman.start_experiment("bench", f"e2e-{mode}", root=tmp / "root")
        # Wait for the collector to have created the run (its answer to our hello), so
        # its start-up (a fresh interpreter importing pyarrow) is not in the throughput.
        if not c.wait_until(lambda: (exp.run_dir / "run.yaml").exists(), 60.0, 0.005):
            raise RuntimeError("the local collector never created the run directory")
        out["collector_startup_s"] = time.perf_counter() - t_start
        collector = c.find_collector_child()
        if collector is None:
            raise RuntimeError("no child process with expman.collector in its command line")
        out["collector_pid"] = collector.pid
        coll_cpu0 = collector.cpu_times()
        rank_cpu0 = os.times()
        sampler = c.RssSampler(collector.pid, 0.02).start()
        out["collector_rss_idle_mb"] = c.rss_bytes(collector.pid) / 2**20

        t0 = time.perf_counter()
        if mode == "metric":
            lm = exp.log_metric
            for i in range(points):
                lm("loss", i * 0.001, step=i)
        else:
            names = [f"layer{k}/grad_norm" for k in range(KEYS)]
            lms = exp.log_metrics
            for i in range(points // KEYS):
                v = i * 0.001
                lms({names[0]: v, names[1]: v, names[2]: v, names[3]: v,
                     names[4]: v, names[5]: v, names[6]: v, names[7]: v}, step=i)
        t1 = time.perf_counter()
        out["hwm_before_finish_mb"] = c.hwm_bytes(collector.pid) / 2**20
        out["stats_before_finish"] = exp.stats()
        confirmed = exp.finish(timeout=120)
        t2 = time.perf_counter()

        out["collector_peak_sampled_mb"] = sampler.stop() / 2**20
        out["collector_samples"] = sampler.samples
        out["hwm_after_finish_mb"] = c.hwm_bytes(collector.pid) / 2**20
        coll_cpu1 = collector.cpu_times()
        rank_cpu1 = os.times()
        out["collector_cpu_s"] = (coll_cpu1.user - coll_cpu0.user) + (coll_cpu1.system - coll_cpu0.system)
        out["rank_cpu_s"] = (rank_cpu1.user - rank_cpu0.user) + (rank_cpu1.system - rank_cpu0.system)
        out["rank_peak_rss_mb"] = c.hwm_bytes() / 2**20
        logged = points if mode == "metric" else (points // KEYS) * KEYS
        out["logged"] = logged
        out["log_loop_s"] = t1 - t0
        out["finish_s"] = t2 - t1
        out["total_s"] = t2 - t0
        out["points_per_s"] = logged / (t2 - t0)
        out["log_loop_points_per_s"] = logged / (t1 - t0)
        out["finish_confirmed"] = confirmed
        out["stats_after_finish"] = exp.stats()

        t3 = time.perf_counter()
        run = expman.open_run(exp.run_dir)
        tbl = run.metrics()
        out["read_s"] = time.perf_counter() - t3
        out["rows"] = tbl.num_rows
        out["status"] = run.status
        ok = confirmed and tbl.num_rows == logged
        if ok and mode == "metrics":
            import pyarrow.compute as pc

            counts = pc.value_counts(tbl.column("key").cast("string")).to_pylist()
            ok = len(counts) == KEYS and all(x["counts"] == logged // KEYS for x in counts)
        elif ok:
            steps = tbl.column("step")
            mm = pc_min_max(steps)
            ok = mm == (0, logged - 1)
        out["data_ok"] = bool(ok)
    finally:
        try:
            c.shutdown_local_collectors()
        finally:
            c.rmtree_quiet(tmp)
    return out


def pc_min_max(col: Any) -> tuple[int, int]:
    import pyarrow.compute as pc

    mm = pc.min_max(col)
    return mm["min"].as_py(), mm["max"].as_py()


def print_mode(r: dict[str, Any]) -> None:
    print(f"\n== end to end: {r['label']} ({r['logged']:,} points, one rank, local collector)")
    print(f"   collector start-up (start_experiment -> run dir exists): {r['collector_startup_s'] * 1e3:.0f} ms "
          "(not counted below)")
    print(f"   first log call -> finish() returned: {r['total_s']:.2f} s = {r['points_per_s'] / 1e6:.2f} M points/s "
          f"(target >= {c.TARGET_E2E_POINTS_PER_S / 1e6:.0f} M/s: {c.verdict(r['points_per_s'] >= c.TARGET_E2E_POINTS_PER_S)})")
    print(f"   logging loop alone: {r['log_loop_s']:.2f} s = {r['log_loop_points_per_s'] / 1e6:.2f} M points/s; "
          f"finish() alone: {r['finish_s'] * 1e3:.0f} ms (confirmed: {r['finish_confirmed']})")
    s = r["stats_before_finish"]
    print(f"   at the end of the loop: sent {s['sent']:,}, acked {s['acked']:,}, buffered {s['buffered']:,}, "
          f"dropped {s['dropped']:,}")
    print(f"   collector RSS: idle {r['collector_rss_idle_mb']:.0f} MB, peak sampled {r['collector_peak_sampled_mb']:.0f} MB "
          f"({r['collector_samples']} samples), VmHWM before finish {r['hwm_before_finish_mb']:.0f} MB, "
          f"after finish {r['hwm_after_finish_mb']:.0f} MB "
          f"(target <= {c.TARGET_COLLECTOR_RSS_MB} MB: {c.verdict(r['hwm_after_finish_mb'] <= c.TARGET_COLLECTOR_RSS_MB)})")
    print(f"   CPU during the run: rank {r['rank_cpu_s']:.2f} s, collector {r['collector_cpu_s']:.2f} s; "
          f"rank peak RSS {r['rank_peak_rss_mb']:.0f} MB")
    print(f"   read back: {r['rows']:,} rows in {r['read_s']:.2f} s, status {r['status']}: "
          f"{'OK' if r['data_ok'] else 'PROBLEM'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["all", *MODES], default="all")
    p.add_argument("--points", type=int, default=2_000_000, help="points per loop (default 2000000)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.mode != "all":
        r = run_mode(args.mode, args.points)
        print_mode(r)
        c.write_json(args.json, r)
        return 0 if r["data_ok"] else 1
    print(f"machine: {c.machine_line()}")
    results = {m: c.run_child([__file__, "--mode", m, "--points", str(args.points)], timeout=600) for m in MODES}
    c.write_json(args.json, results)
    return 0 if all(r["data_ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
