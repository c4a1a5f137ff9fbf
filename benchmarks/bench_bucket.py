"""Runs in a bucket (issue 17): a collector with --root s3://... uploading to a real
S3-protocol server (moto's, on loopback).

Four figures:
  - end-to-end points/s: a burst of --points points, from the first log_metric to the run
    finished in the bucket with every point readable there;
  - upload lag p50/p99/max: a live run logs a probe point (its value: the wall clock) every
    0.25 s; a separate reader process polls the bucket every 0.25 s and notes when each
    probe becomes visible (so the figures include up to 0.25 s of polling);
  - PUT requests per minute per run, from moto's request log over the live run (PUT lines,
    and POST for multipart uploads; readers only GET, HEAD and LIST);
  - log_metric p50/p99/max while the bucket is up, and while it is stopped (SIGSTOP of the
    moto process) for --down seconds.

    python benchmarks/bench_bucket.py                       # 60 s live, 10 s down, 1 M points
    python benchmarks/bench_bucket.py --seconds 20 --down 5 --points 200000 --upload-interval 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

RATE = 2000  # points per second the live run logs (in batches of 20 every 10 ms)
PROBE_EVERY_S = 0.25

_READER = """
import json, sys, time
import expman
uri, stop = sys.argv[1], sys.argv[2]
from pathlib import Path
seen = {}
while not Path(stop).exists():
    try:
        run = expman.open_run(uri)
        for value in run.metrics("probe")["value"].to_pylist():
            seen.setdefault(value, time.time())
    except Exception:
        pass
    time.sleep(0.25)
print(json.dumps(sorted(seen.items())))
"""


def _moto(work: Path) -> tuple[subprocess.Popen, str, Path]:
    log = work / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=fh,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (m := re.search(r"Running on http://(127\.0\.0\.1:\d+)", log.read_text())):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"moto's server did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc, m[1], log


def _writes(log: Path, start: int) -> tuple[int, int]:
    """(write requests, bytes read) in moto's log past byte offset `start`."""
    data = log.read_bytes()
    text = data[start:].decode(errors="replace")
    return len(re.findall(r'"(?:\x1b\[[0-9;]*m)*(?:PUT|POST|DELETE) /', text)), len(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=1_000_000, help="points in the end-to-end burst")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the live run (lag, PUTs per minute)")
    p.add_argument("--down", type=float, default=10.0, help="seconds the bucket is stopped during the live run")
    p.add_argument("--upload-interval", type=float, default=10.0, help="the collector's --upload-interval")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("moto") is None:
        print("moto[server] is not installed (pip install 'moto[server]'): skipped")
        return 0
    work = c.make_tmpdir("bucket")
    os.environ.update({"EXPMAN_SPOOL_DIR": str(work / "spool"), "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_ALLOW_HTTP": "true",
                       "AWS_CONFIG_FILE": str(work / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(work / "none")})
    moto, endpoint, moto_log = _moto(work)
    os.environ["AWS_ENDPOINT_URL"] = f"http://{endpoint}"
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir("bench")
    uri = "s3://bench/runs"
    ready = work / "ready.yaml"
    collector = subprocess.Popen([sys.executable, "-m", "expman.collector", "--root", uri, "--staging-dir", str(work / "staging"),
                                  "--upload-interval", str(args.upload_interval), "--bind", f"ipc://{work}/c.sock",
                                  "--ready-file", str(ready), "--log-level", "WARNING"])
    results: dict = {"machine": c.machine_line(), "upload_interval_s": args.upload_interval}
    ok = True
    try:
        while not ready.exists():
            time.sleep(0.02)
        sock = yaml.safe_load(ready.read_text())["endpoints"][0]
        import expman

        ok &= _burst(expman, sock, uri, args.points, results)
        ok &= _burst(expman, None, str(work / "local"), args.points, results, key="burst_local")
        ok &= _live(expman, sock, uri, args, moto, moto_log, work / "reader.stop", results)
        results["collector_peak_rss_mb"] = round(c.hwm_bytes(collector.pid) / 2**20, 1)
    finally:
        os.kill(moto.pid, signal.SIGCONT)
        c.stop_process(collector, 60)
        c.stop_process(moto)
        c.rmtree_quiet(work)
    _report(results)
    c.write_json(args.json, results)
    return 0 if ok else 1


def _finished_rows(expman, run_uri: str, key: str) -> int:  # noqa: ANN001
    try:
        run = expman.open_run(run_uri)
        return run.metrics(key).num_rows if run.status == "finished" else -1
    except Exception:
        return -1


def _burst(expman, sock: str | None, uri: str, points: int, results: dict, key: str = "burst") -> bool:  # noqa: ANN001
    """`sock` None: the same burst into a local root (a private collector), the baseline."""
    exp = expman.start_experiment("bench", "burst", root=uri, collector=sock, code_dir=False, finish_timeout=600)
    started = time.perf_counter()
    log = exp.log_metric
    for step in range(points):
        log("loss", 0.5, step)
    exp.finish()
    run_uri = f"{uri}/bench/{exp.run_dir.name}"
    c.wait_until(lambda: _finished_rows(expman, run_uri, "loss") == points, 600, step=0.1)
    elapsed = time.perf_counter() - started
    rows = _finished_rows(expman, run_uri, "loss")
    results[key] = {"points": points, "seconds": round(elapsed, 2), "points_per_s": round(points / elapsed)}
    if rows != points:
        print(f"DATA CHECK FAILED: the burst run has {rows} of {points} points in the bucket")
        return False
    return True


def _live(expman, sock: str, uri: str, args: argparse.Namespace, moto: subprocess.Popen, moto_log: Path,  # noqa: ANN001
          stop: Path, results: dict) -> bool:
    exp = expman.start_experiment("bench", "live", root=uri, collector=sock, code_dir=False, finish_timeout=600)
    run_uri = f"{uri}/bench/{exp.run_dir.name}"
    reader = subprocess.Popen([sys.executable, "-c", _READER, run_uri, str(stop)], stdout=subprocess.PIPE, text=True)
    _, offset = _writes(moto_log, 0)
    up, down = array("q"), array("q")
    clock, log = time.perf_counter_ns, exp.log_metric
    began = time.monotonic()
    down_from = began + max(0.0, (args.seconds - args.down) / 2)
    down_until = down_from + args.down
    stopped = False
    outage = [0.0, 0.0]  # wall clock: when the bucket was stopped and continued
    step, next_probe = 0, began
    while (now := time.monotonic()) < began + args.seconds:
        if not stopped and down_from <= now < down_until:
            os.kill(moto.pid, signal.SIGSTOP)
            stopped, outage[0] = True, time.time()
        elif stopped and now >= down_until:
            os.kill(moto.pid, signal.SIGCONT)
            stopped, outage[1] = False, time.time()
        into = down if stopped else up
        for _ in range(RATE // 100):
            t0 = clock()
            log("loss", 0.5, step)
            into.append(clock() - t0)
            step += 1
        if now >= next_probe:
            log("probe", time.time(), step)
            next_probe += PROBE_EVERY_S
        time.sleep(0.01)
    if stopped:
        os.kill(moto.pid, signal.SIGCONT)
        outage[1] = time.time()
    exp.finish()
    c.wait_until(lambda: _finished_rows(expman, run_uri, "loss") == step, 300, step=0.1)
    writes, _ = _writes(moto_log, offset)
    stop.touch()
    seen = json.loads(reader.communicate(timeout=120)[0] or "[]")
    # Points logged and seen with the bucket up, apart from those the outage held back.
    up_lags = sorted(t - v for v, t in seen if t < outage[0] or v > outage[1] or not args.down)
    held_lags = sorted(t - v for v, t in seen if not (t < outage[0] or v > outage[1] or not args.down))
    rows = _finished_rows(expman, run_uri, "loss")
    minutes = (time.monotonic() - began) / 60
    results["live"] = {
        "seconds": args.seconds, "points": step, "down_s": args.down,
        "lag_s": _quantiles(up_lags), "lag_held_by_outage_s": _quantiles(held_lags),
        "write_requests": writes, "write_requests_per_minute": round(writes / minutes, 1),
        "log_metric_up": c.percentiles(list(up)), "log_metric_down": c.percentiles(list(down)) if down else None,
    }
    if rows != step:
        print(f"DATA CHECK FAILED: the live run has {rows} of {step} points in the bucket")
        return False
    return True


def _quantiles(lags: list[float]) -> dict:
    if not lags:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(lags), "p50": round(lags[len(lags) // 2], 2), "p99": round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 2),
            "max": round(lags[-1], 2)}


def _report(r: dict) -> None:
    print(r["machine"])
    b, live = r["burst"], r["live"]
    print(f"end to end into the bucket: {b['points']:,} points in {b['seconds']} s = {b['points_per_s']:,} points/s "
          f"(first log_metric to finished and readable in the bucket)")
    local = r["burst_local"]
    print(f"the same into a local root (private collector): {local['seconds']} s = {local['points_per_s']:,} points/s")
    lag, held = live["lag_s"], live["lag_held_by_outage_s"]
    print(f"upload lag (point logged -> visible in the bucket), --upload-interval {r['upload_interval_s']:g} s: "
          f"p50 {lag['p50']} s, p99 {lag['p99']} s, max {lag['max']} s ({lag['n']} probes); points the {live['down_s']:g} s "
          f"outage held back: p50 {held['p50']} s, max {held['max']} s ({held['n']} probes)")
    print(f"write requests (PUT/POST/DELETE) for one live run: {live['write_requests']} in {live['seconds']:g} s "
          f"= {live['write_requests_per_minute']} per minute")
    rows = []
    for name in ("log_metric_up", "log_metric_down"):
        q = live[name]
        if q:
            rows.append([name.removeprefix("log_metric_").replace("up", "bucket up").replace("down", "bucket stopped"),
                         f"{q['n']:,}", c.fmt_ns(q["p50"]), c.fmt_ns(q["p99"]), c.fmt_ns(q["max"])])
    print(c.table(rows, ["log_metric", "calls", "p50", "p99", "max"]))
    print(f"collector peak RSS: {r['collector_peak_rss_mb']} MB")


if __name__ == "__main__":
    raise SystemExit(main())
