"""Per-call latency of the hot path: `exp.log_metric("loss", v, step=i)`.

Three cases, each in a fresh interpreter (so each has exactly one Sender thread):
  a  collector up      - default local mode, start_experiment(root=tmp) spawns a collector
  b  no collector      - collector="ipc://.../nothing.sock": nothing listens there
  c  SIGSTOPped        - our own `python -m expman.collector`, SIGSTOPped while we measure,
                          SIGCONTed afterwards; then finish() and check every point landed
Each case also measures the floor (an empty method timed the same way), untimed
throughput, and `log_metrics` with a 10-key dict (per call and per point).

    python benchmarks/bench_log_metric.py                 # all cases
    python benchmarks/bench_log_metric.py --case a --calls 500000
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

CASES = {
    "a": "collector up (local mode)",
    "b": "collector not started",
    "c": "collector SIGSTOPped",
}


def _measure(exp: Any, calls: int, dict_calls: int, values: list[float], dicts: list[dict]) -> dict[str, Any]:
    gc.collect()
    lat = c.percentiles(c.time_log_metric(exp.log_metric, calls, values))
    gc.collect()
    lat["calls_per_s"] = c.throughput_log_metric(exp.log_metric, calls, values)
    gc.collect()
    many = c.percentiles(c.time_log_metrics(exp.log_metrics, dict_calls, dicts))
    t0 = time.perf_counter()
    lm = exp.log_metrics
    for i in range(dict_calls):
        lm(dicts[i % len(dicts)], step=i)
    elapsed = time.perf_counter() - t0
    keys = len(dicts[0])
    many["keys"] = keys
    many["points_per_s"] = dict_calls * keys / elapsed
    many["ns_per_point"] = elapsed * 1e9 / (dict_calls * keys)
    many["p50_per_point"] = many["p50"] / keys
    return {"log_metric": lat, "log_metrics": many}


def run_case(case: str, calls: int, dict_calls: int) -> dict[str, Any]:
    import expman

    values = [i * 1e-3 for i in range(calls)]
    dicts = [{f"m{k:02d}": (i + k) * 1e-3 for k in range(10)} for i in range(64)]
    floor = c.floor_stats(calls, values)
    floor_many = c.percentiles(c.time_log_metrics(c._Empty().log_metrics, dict_calls, dicts))
    tmp = c.make_tmpdir(case)
    out: dict[str, Any] = {"case": case, "label": CASES[case], "calls": calls, "dict_calls": dict_calls,
                           "floor": floor, "floor_log_metrics": floor_many}
    warm = 1000
    expected = warm + 2 * calls + 2 * dict_calls * 10
    ext = None
    try:
        if case == "a":
            exp = expman.start_experiment("bench", "latency-a", root=tmp / "root")
        elif case == "b":
            (tmp / "nothing").mkdir()
            exp = expman.start_experiment("bench", "latency-b", root=tmp / "root",
                                          collector=f"ipc://{tmp / 'nothing' / 'nothing.sock'}")
        else:
            ext = c.ExternalCollector(tmp).start()
            exp = expman.start_experiment("bench", "latency-c", root=ext.root, collector=ext.endpoint)
        for i in range(warm):
            exp.log_metric("loss", 0.5, step=i)
        if case in ("a", "c"):
            t0 = time.perf_counter()
            if not c.wait_until(lambda: exp.stats()["acked"] >= 1, 30.0):
                raise RuntimeError(f"case {case}: the collector never acknowledged a point")
            out["collector_up_s"] = time.perf_counter() - t0
        else:
            time.sleep(0.05)  # let the sender try (and fail) to deliver
        if ext is not None:
            c.wait_until(lambda: exp.stats()["acked"] >= warm, 10.0)
            ext.sigstop()
            acked_before = exp.stats()["acked"]
        out.update(_measure(exp, calls, dict_calls, values, dicts))
        out["stats_after_logging"] = exp.stats()
        if ext is not None:
            time.sleep(0.2)
            out["acked_while_stopped"] = exp.stats()["acked"] - acked_before
            ext.sigcont()
        t0 = time.perf_counter()
        finish_timeout = 2.0 if case == "b" else 60.0
        confirmed = exp.finish(timeout=finish_timeout)
        out["finish_s"] = time.perf_counter() - t0
        out["finish_confirmed"] = confirmed
        out["stats_after_finish"] = exp.stats()
        out["expected_points"] = expected
        if case == "b":
            s = exp.stats()
            # Nothing can land; nothing may be lost silently either.
            out["data_ok"] = (not confirmed and s["dropped"] == 0 and s["buffered"] == expected
                              and out["finish_s"] < finish_timeout + 1.0)
            out["data_note"] = (f"finish() -> {confirmed} after {out['finish_s']:.1f} s; "
                                f"{s['buffered']:,} held, {s['dropped']} dropped")
        else:
            rows = expman.open_run(exp.run_dir).metrics().num_rows
            out["rows"] = rows
            out["data_ok"] = confirmed and rows == expected
            out["data_note"] = f"{rows:,} rows on disk, expected {expected:,}"
            if ext is not None:
                out["data_note"] += f"; {out['acked_while_stopped']} acked while stopped"
    finally:
        try:
            if ext is not None:
                ext.close()
            c.shutdown_local_collectors()
        finally:
            c.rmtree_quiet(tmp)
    return out


def print_case(r: dict[str, Any]) -> None:
    f, lm, many = r["floor"], r["log_metric"], r["log_metrics"]
    print(f"\n== log_metric, case {r['case']}: {r['label']}  ({r['calls']:,} timed calls)")
    if "collector_up_s" in r:
        print(f"   collector answered {r['collector_up_s'] * 1e3:.0f} ms after the first point")
    rows = []
    for name, s in (("floor (empty method)", f), ("log_metric", lm)):
        rows.append([name, c.fmt_ns(s["p50"]), c.fmt_ns(s["p99"]), c.fmt_ns(s["p999"]), c.fmt_ns(s["max"]),
                     f"{s['over_10us']}", f"{s['over_1ms']}", f"{s['calls_per_s'] / 1e6:.2f} M/s"])
    rows.append(["log_metric - floor", c.fmt_ns(lm["p50"] - f["p50"]), c.fmt_ns(lm["p99"] - f["p99"]),
                 c.fmt_ns(lm["p999"] - f["p999"]), "", "", "", ""])
    print(c.table(rows, ["", "p50", "p99", "p99.9", "max", ">10µs", ">1ms", "calls/s (untimed)"]))
    print(f"   timer alone (two perf_counter_ns): p50 {c.fmt_ns(f['timer_only_p50'])}")
    print(f"   log_metrics({many['keys']} keys): per call p50 {c.fmt_ns(many['p50'])} p99 {c.fmt_ns(many['p99'])} "
          f"p99.9 {c.fmt_ns(many['p999'])} max {c.fmt_ns(many['max'])}; "
          f"per point {c.fmt_ns(many['ns_per_point'])} untimed ({many['points_per_s'] / 1e6:.2f} M points/s), "
          f"floor per call p50 {c.fmt_ns(r['floor_log_metrics']['p50'])}")
    if "acked_while_stopped" in r:
        print(f"   points acknowledged while the collector was stopped: {r['acked_while_stopped']}")
    print(f"   finish(): {r['finish_s'] * 1e3:.0f} ms; data: {'OK' if r['data_ok'] else 'PROBLEM'} ({r['data_note']})")


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool, bool]]:
    """(figure, measured, met raw, met net of the floor) for the targets."""
    lm, f = r["log_metric"], r["floor"]
    return [
        ("p50 <= 0.4 µs", c.fmt_ns(lm["p50"]), lm["p50"] <= c.TARGET_P50_NS, lm["p50"] - f["p50"] <= c.TARGET_P50_NS),
        ("p99 <= 2 µs", c.fmt_ns(lm["p99"]), lm["p99"] <= c.TARGET_P99_NS, lm["p99"] - f["p99"] <= c.TARGET_P99_NS),
        ("max <= 1 ms", c.fmt_ns(lm["max"]), lm["max"] <= c.TARGET_MAX_NS, lm["max"] <= c.TARGET_MAX_NS),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["all", *CASES], default="all")
    p.add_argument("--calls", type=int, default=200_000, help="timed log_metric calls per case (default 200000)")
    p.add_argument("--dict-calls", type=int, default=20_000, help="timed log_metrics calls (10 keys each)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.case != "all":
        r = run_case(args.case, args.calls, args.dict_calls)
        print_case(r)
        c.write_json(args.json, r)
        return 0 if r["data_ok"] else 1
    print(f"machine: {c.machine_line()}")
    results = {}
    for case in CASES:  # one fresh interpreter per case: one Sender thread, no leftovers
        results[case] = c.run_child([__file__, "--case", case, "--calls", str(args.calls),
                                     "--dict-calls", str(args.dict_calls)], timeout=300)
    print("\n== log_metric targets (raw figure includes the timer; 'net' subtracts the floor's same percentile)")
    rows = []
    for case, r in results.items():
        for name, measured, raw, net in targets(r):
            rows.append([f"{case}: {r['label']}", name, measured, c.verdict(raw), c.verdict(net)])
    print(c.table(rows, ["case", "target", "measured", "raw", "net of floor"]))
    c.write_json(args.json, results)
    return 0 if all(r["data_ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
