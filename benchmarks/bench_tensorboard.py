"""`expman export --format tensorboard`: points written per second.

Logs a run of --points points (4 keys, one rank, every point with a step) through a
private collector, then times the export the CLI does (read the run's metrics, write
the event files) and checks that TensorBoard's own reader finds every point.

    python benchmarks/bench_tensorboard.py --points 1000000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

TARGET_POINTS_PER_S = 500_000
KEYS = ("loss", "accuracy", "lr", "grad_norm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    import expman
    from expman._compat.tensorboard import export_tensorboard
    from expman._rank.start import shutdown

    work = c.make_tmpdir("tb")
    try:
        steps = args.points // len(KEYS)
        with expman.start_experiment("bench", "tb", root=work / "runs") as exp:
            for step in range(steps):
                exp.log_metrics({k: step * 1e-3 + i for i, k in enumerate(KEYS)}, step=step)
        shutdown()
        run = expman.open_run(exp.run_dir)
        started = time.perf_counter()
        counts = export_tensorboard(run, work / "tb")
        seconds = time.perf_counter() - started
        rate = counts["scalars"] / seconds
        from tensorboard.backend.event_processing import event_accumulator as ea

        acc = ea.EventAccumulator(str(work / "tb" / "rank0"), size_guidance={ea.SCALARS: 0})
        acc.Reload()
        read_back = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
        ok = rate >= TARGET_POINTS_PER_S and read_back == counts["scalars"]
        print(c.machine_line())
        print(f"export --format tensorboard: {counts['scalars']:,} points in {seconds:.2f} s = "
              f"{rate / 1e3:,.0f}k points/s (target {TARGET_POINTS_PER_S / 1e3:,.0f}k) "
              f"{c.verdict(ok)}; TensorBoard's reader found {read_back:,}")
        c.write_json(args.json, {"points": counts["scalars"], "seconds": seconds, "points_per_s": rate,
                                 "read_back": read_back, "ok": ok})
        return 0 if ok else 1
    finally:
        c.rmtree_quiet(work)


if __name__ == "__main__":
    sys.exit(main())
