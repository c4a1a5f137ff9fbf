"""What console capture costs a training loop: a print's latency with and without it.

    python benchmarks/bench_console.py                # 100k prints each way
    python benchmarks/bench_console.py --prints 500000

stdout goes to /dev/null in both cases, so the terminal's speed is not measured; the
captured run is a real one (local collector), and its console lines are counted at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c  # noqa: E402


def timed_prints(n: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        print("step", i, "loss", 0.5)
        out.append(clock() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prints", type=int, default=100_000)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    import expman

    terminal = sys.stdout
    results = {}
    with open(os.devnull, "w") as devnull, tempfile.TemporaryDirectory() as root:
        sys.stdout = devnull
        try:
            results["without capture"] = timed_prints(args.prints)
            with expman.start_experiment("bench", "console", root=root) as exp:
                results["with capture"] = timed_prints(args.prints)
        finally:
            sys.stdout = terminal
        lines = expman.open_run(exp.run_dir).console().num_rows
    print(f"machine: {c.machine_line()}")
    summary = {}
    for name, samples in results.items():
        samples.sort()
        q = {k: samples[min(len(samples) - 1, int(f * len(samples)))] for k, f in (("p50", .5), ("p99", .99), ("p999", .999))}
        q["max"] = samples[-1]
        summary[name] = q
        print(f"print() {name:>16}: p50 {c.fmt_ns(q['p50'])}  p99 {c.fmt_ns(q['p99'])}  "
              f"p99.9 {c.fmt_ns(q['p999'])}  max {c.fmt_ns(q['max'])}")
    print(f"console lines stored: {lines:,} of {args.prints:,}")
    c.write_json(args.json, {"prints": summary, "stored": lines})
    return 0 if lines == args.prints else 1


if __name__ == "__main__":
    sys.exit(main())
