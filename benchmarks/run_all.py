"""Run every expman benchmark and print one summary table against the targets.

    python benchmarks/run_all.py                  # defaults: 200k calls, 2M points, 8 ranks x 500k, then the rest
    python benchmarks/run_all.py --calls 500000 --points 4000000
    python benchmarks/run_all.py --core-only      # only the four whose figures make the table (~1 min on 2 cores)

The four core benchmarks (log_metric latency, end to end, rank memory, distributed) feed
the summary table. Every other `bench_*.py` in this folder then runs too, with the short
settings in OTHERS (or none), its own report streaming as it goes; the table lists each
with its exit status and time.

Each benchmark runs in its own fresh interpreter(s); their detailed output streams
first, the summary comes last. Exit status 1 if a data check failed (points missing);
missed performance targets are reported, not treated as errors.
"""

from __future__ import annotations

import argparse
import subprocess
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

HERE = Path(__file__).resolve().parent
CORE = ("bench_log_metric.py", "bench_end_to_end.py", "bench_memory.py", "bench_distributed.py")
OTHERS = {  # short settings, so the whole run stays in minutes; each script's --help has the full ones
    "bench_artifacts.py": ["--format-mb", "32", "--big-mb", "32", "--repeats", "50", "--calls", "50000"],
    "bench_bucket.py": ["--seconds", "20", "--down", "5", "--points", "200000", "--upload-interval", "2"],
    "bench_collector_down.py": ["--down", "3"],
    "bench_hardware.py": ["--seconds", "5"],
    "bench_tui.py": ["--points", "1000000", "--trials", "2", "--app-trials", "1", "--live-seconds", "4"],
    "bench_read.py": ["--points", "2000000", "--trials", "1"],
    "bench_ls.py": ["--runs", "2000", "--trials", "2"],
    "bench_concurrent.py": ["--runs", "10", "--points", "500"],
    "bench_kill.py": ["--tries", "1"],
    "bench_media.py": ["--seconds", "2"],
    "bench_console.py": ["--prints", "20000"],
    "bench_tensorboard.py": ["--points", "200000"],
    "bench_wide_run.py": ["--keys", "100000"],
    "bench_collector_stages.py": ["--points", "524288"],
}


def run_others(add) -> bool:  # noqa: ANN001 - the table's add()
    """Every bench_*.py beyond the core four; True when all exited 0."""
    ok = True
    for script in sorted(HERE.glob("bench_*.py")):
        if script.name in CORE:
            continue
        args = OTHERS.get(script.name, [])
        print(f"\n{'=' * 20} {script.name} {' '.join(args)} {'=' * 20}", flush=True)
        started = time.perf_counter()
        try:
            code = subprocess.run([c.PYTHON, str(script), *args], timeout=1200,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            code = "timed out"
        add(script.name, "ran (its figures above)", f"exit {code} in {time.perf_counter() - started:.0f} s", "exit 0",
            code == 0)
        ok = ok and code == 0
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200_000, help="timed log_metric calls per latency case")
    p.add_argument("--dict-calls", type=int, default=20_000, help="timed log_metrics calls (10 keys each)")
    p.add_argument("--points", type=int, default=2_000_000, help="points per end-to-end loop")
    p.add_argument("--memory-points", type=int, default=5000, help="points logged in the memory benchmark")
    p.add_argument("--dist-ranks", type=int, default=8, help="rank processes in the distributed benchmark")
    p.add_argument("--dist-points", type=int, default=500_000, help="points per rank in the distributed benchmark")
    p.add_argument("--core-only", action="store_true", help="skip the benchmarks beyond the core four")
    args = p.parse_args(argv)

    started = time.perf_counter()
    print(f"expman benchmarks; machine: {c.machine_line()}", flush=True)
    lat = c.run_child([str(HERE / "bench_log_metric.py"), "--calls", str(args.calls),
                       "--dict-calls", str(args.dict_calls)], timeout=900)
    e2e = c.run_child([str(HERE / "bench_end_to_end.py"), "--points", str(args.points)], timeout=900)
    mem = c.run_child([str(HERE / "bench_memory.py"), "--points", str(args.memory_points)], timeout=300)
    dist = c.run_child([str(HERE / "bench_distributed.py"), "--ranks", str(args.dist_ranks),
                        "--points", str(args.dist_points)], timeout=900)

    rows: list[list[str]] = []

    def add(area: str, figure: str, measured: str, target: str, ok: bool | None, net: bool | None = None) -> None:
        rows.append([area, figure, measured, target, "-" if ok is None else c.verdict(ok),
                     "" if net is None else c.verdict(net)])

    for case, r in lat.items():
        f = r["floor"]
        add(f"floor (run of case {case})", "empty method, same timer",
            f"p50 {c.fmt_ns(f['p50'])} p99 {c.fmt_ns(f['p99'])} p99.9 {c.fmt_ns(f['p999'])} max {c.fmt_ns(f['max'])}; "
            f"{f['calls_per_s'] / 1e6:.1f} M calls/s", "(reference)", None)
    for case, r in lat.items():
        lm, f, many = r["log_metric"], r["floor"], r["log_metrics"]
        area = f"log_metric {case}: {r['label']}"
        add(area, "p50 (net of floor)", f"{c.fmt_ns(lm['p50'])} ({c.fmt_ns(lm['p50'] - f['p50'])})", "<= 0.4 µs",
            lm["p50"] <= c.TARGET_P50_NS, lm["p50"] - f["p50"] <= c.TARGET_P50_NS)
        add(area, "p99 (net of floor)", f"{c.fmt_ns(lm['p99'])} ({c.fmt_ns(lm['p99'] - f['p99'])})", "<= 2 µs",
            lm["p99"] <= c.TARGET_P99_NS, lm["p99"] - f["p99"] <= c.TARGET_P99_NS)
        add(area, "p99.9 (net of floor)", f"{c.fmt_ns(lm['p999'])} ({c.fmt_ns(lm['p999'] - f['p999'])})", "", None)
        add(area, "max (calls > 10 µs, > 1 ms)", f"{c.fmt_ns(lm['max'])} ({lm['over_10us']}, {lm['over_1ms']})",
            "<= 1 ms", lm["max"] <= c.TARGET_MAX_NS)
        add(area, "throughput (untimed loop)", f"{lm['calls_per_s'] / 1e6:.2f} M calls/s", "", None)
        add(area, "log_metrics 10 keys: per call p50 / per point",
            f"{c.fmt_ns(many['p50'])} / {c.fmt_ns(many['ns_per_point'])} ({many['points_per_s'] / 1e6:.2f} M pts/s)",
            "", None)
        add(area, "data check", r["data_note"], "all points", r["data_ok"])
    for mode, r in e2e.items():
        area = f"end to end: {r['label']}"
        add(area, "points/s (first log -> finish returned)",
            f"{r['points_per_s'] / 1e6:.2f} M/s ({r['logged'] / 1e6:.0f} M in {r['total_s']:.2f} s)", ">= 2 M/s",
            r["points_per_s"] >= c.TARGET_E2E_POINTS_PER_S)
        add(area, "logging loop alone", f"{r['log_loop_points_per_s'] / 1e6:.2f} M/s", "", None)
        add(area, "finish() alone", f"{r['finish_s'] * 1e3:.0f} ms", "", None)
        peak = max(r["hwm_after_finish_mb"], r["collector_peak_sampled_mb"])
        add(area, "collector peak RSS (VmHWM; sampled)",
            f"{r['hwm_after_finish_mb']:.0f} MB; {r['collector_peak_sampled_mb']:.0f} MB "
            f"(idle {r['collector_rss_idle_mb']:.0f} MB)", "<= 200 MB", peak <= c.TARGET_COLLECTOR_RSS_MB)
        add(area, "rows read back", f"{r['rows']:,} (status {r['status']})", f"exactly {r['logged']:,}",
            r["data_ok"])
    add("rank memory", "import expman", f"+{mem['import_mb']:.1f} MB, {mem['open']['import_s'] * 1e3:.0f} ms",
        "", None)
    add("rank memory", "open experiment + points logged, over import",
        f"+{mem['overhead_mb']:.1f} MB", "<= 20 MB", mem["overhead_mb"] <= c.TARGET_RANK_OVERHEAD_MB)
    add("rank memory", "import expman pulls pyarrow/textual",
        "no" if not mem["heavy_imported"] else ", ".join(mem["heavy_imported"]), "no", not mem["heavy_imported"])
    if "stalled_mb" in mem:
        add("rank memory", "1 M points held, collector unreachable", f"+{mem['stalled_mb']:.1f} MB", "", None)

    for r in dist.values():
        area = f"distributed {r['setup']}: {r['ranks']} ranks, {r['label'].split(', ', 1)[1]}"
        add(area, "aggregate points/s (first log -> last finish returned)",
            f"{r['points_per_s'] / 1e6:.2f} M/s ({r['logged'] / 1e6:.0f} M in {r['total_s']:.2f} s)", ">= 2 M/s",
            r["points_per_s"] >= c.TARGET_E2E_POINTS_PER_S)
        if r.get("collector_side_pps"):
            add(area, "collector side: rows / busy window; rows per collector CPU-s",
                f"{r['collector_side_pps'] / 1e6:.2f} M/s; {r['rows_per_collector_cpu_s'] / 1e6:.2f} M/CPU-s", "", None)
        cpu = r["ranks_cpu_s"] + r["collectors_cpu_s"]
        add(area, "CPU per point: ranks + collectors (others on the machine)",
            f"{r['ranks_cpu_s'] * 1e9 / r['logged']:.0f} + {r['collectors_cpu_s'] * 1e9 / r['logged']:.0f} ns "
            f"(ceiling {(os.cpu_count() or 1) * r['logged'] / cpu / 1e6:.2f} M/s; others "
            f"{max(0.0, r['machine_busy_s'] - cpu):.1f} CPU-s)", "", None)
        peak = max(max(f["hwm_mb"], f["peak_sampled_mb"]) for f in r["collector_figures"].values())
        add(area, "collector peak RSS (VmHWM, each collector)",
            " + ".join(f"{role} {f['hwm_mb']:.0f} MB" for role, f in r["collector_figures"].items()), "<= 200 MB",
            peak <= c.TARGET_COLLECTOR_RSS_MB)
        ck = r["check"]
        add(area, "points lost / duplicated (per-rank step sequences)",
            f"{ck['lost']} / {ck['duplicates']} of {ck['expected_rows']:,}", "0 / 0", r["data_ok"])

    others_ok = True if args.core_only else run_others(add)

    print(f"\n{'=' * 30} SUMMARY {'=' * 30}")
    print(f"machine: {c.machine_line()}")
    print("latency figures include the timer (two perf_counter_ns calls); 'net of floor' subtracts the "
          "same percentile of an empty method timed the same way")
    print(c.table(rows, ["area", "figure", "measured", "target", "verdict", "net of floor"]))
    missed = [r for r in rows if r[4] == "MISSED"]
    print(f"\n{len([r for r in rows if r[4] == 'MET'])} met, {len(missed)} missed; "
          f"total {time.perf_counter() - started:.0f} s")
    data_ok = (all(r["data_ok"] for r in lat.values()) and all(r["data_ok"] for r in e2e.values())
               and all(r["data_ok"] for r in dist.values()))
    return 0 if data_ok and others_ok else 1


if __name__ == "__main__":
    sys.exit(main())
