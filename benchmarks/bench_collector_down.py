"""log_metric latency while the collector is down (SIGSTOPped) for N seconds (issue 7).

The rank keeps logging as fast as it can; frames past the in-memory budget spill to the
spool. Afterwards the collector resumes and every point must land exactly once.

    python benchmarks/bench_collector_down.py            # 10 s down
    python benchmarks/bench_collector_down.py --down 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--down", type=float, default=10.0, help="seconds the collector stays stopped")
    p.add_argument("--buffer-mb", type=int, default=64, help="the rank's in-memory budget before spilling")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="expman-bench-down-", dir="/tmp"))
    os.environ["EXPMAN_SPOOL_DIR"] = str(work / "spool")
    import expman

    ready = work / "ready.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "expman.collector", "--root", str(work / "runs"),
                             "--bind", f"ipc://{work}/c.sock", "--ready-file", str(ready), "--log-level", "WARNING"])
    try:
        while not ready.exists():
            time.sleep(0.02)
        endpoint = yaml.safe_load(ready.read_text())["endpoints"][0]
        exp = expman.start_experiment("bench", "down", root=work / "runs", collector=endpoint,
                                      max_buffer_bytes=args.buffer_mb << 20, finish_timeout=300)
        exp.log_metric("loss", 0.0, step=0)
        while exp.stats()["acked"] < 1:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)
        lat = array("q")
        clock, log = time.perf_counter_ns, exp.log_metric
        end = time.monotonic() + args.down
        step = 1
        while True:
            for _ in range(10_000):
                t0 = clock()
                log("loss", 0.5, step)
                lat.append(clock() - t0)
                step += 1
            if time.monotonic() >= end:
                break
        stats = exp.stats()
        os.kill(proc.pid, signal.SIGCONT)
        t_resume = time.perf_counter()
        confirmed = exp.finish()
        recover = time.perf_counter() - t_resume
        rows = expman.open_run(exp.run_dir).metrics("loss").num_rows
        ordered = sorted(lat)
        n = len(ordered)

        def pct(q: float) -> str:
            return f"{ordered[min(n - 1, int(q * n))] / 1000:.2f} µs"

        print(f"collector down {args.down:.0f} s; {n:,} log_metric calls while down ({n / args.down / 1e6:.2f} M/s)")
        print(f"  latency p50 {pct(0.5)}  p99 {pct(0.99)}  p99.9 {pct(0.999)}  max {ordered[-1] / 1e6:.2f} ms"
              f"  (calls > 1 ms: {sum(1 for x in ordered if x > 1_000_000)})")
        print(f"  while down: buffered {stats['buffered']:,}, spilled {stats['spilled']:,}, dropped {stats['dropped']:,}")
        print(f"  after resume: finish() {'confirmed' if confirmed else 'TIMED OUT'} in {recover:.2f} s;"
              f" rows on disk {rows:,} of {step:,} logged; points lost {step - rows:,}")
        return 0 if rows == step else 1
    finally:
        c.stop_process(proc, 30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
