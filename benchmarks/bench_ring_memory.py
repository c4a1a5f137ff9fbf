"""What a run's point ring holds in memory (issue 20: an idle run <= 50 KB).

--runs runs in one process (local mode: one collector), each in its own ring under a
fresh private folder in /dev/shm ($EXPMAN_RING_DIR, so other users of /dev/shm do not
count). Measured from the rings' allocated blocks (st_blocks x 512, what tmpfs holds in
memory for the file), per run: right after start_experiment (idle), after each run logged
--points points (flat out, then every point acknowledged), and the machine's Shmem
(/proc/meminfo) change over the same span as a cross-check (noisy beside other processes).

    python benchmarks/bench_ring_memory.py --runs 100 --points 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402


def ring_bytes(folder: Path) -> list[int]:
    """Allocated bytes of each ring file in `folder`."""
    return [p.stat().st_blocks * 512 for p in folder.glob("*.ring")]


def shmem_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--points", type=int, default=2000, help="points each run logs (default 2000)")
    args = p.parse_args()
    tmp = c.make_tmpdir("ringmem")
    rings = Path(tempfile.mkdtemp(prefix="expman-bench-rings-", dir="/dev/shm"))
    os.environ["EXPMAN_RING_DIR"] = str(rings)
    import expman

    try:
        shm0 = shmem_bytes()
        exps = [expman.start_experiment("ringmem", f"r{i}", root=tmp / "root") for i in range(args.runs)]
        idle = ring_bytes(rings)
        shm1 = shmem_bytes()
        for step in range(args.points):
            for e in exps:
                e.log_metric("loss", float(step), step=step)
        deadline = time.monotonic() + 120
        while any(e.stats()["buffered"] for e in exps) and time.monotonic() < deadline:
            time.sleep(0.01)
        logged = ring_bytes(rings)
        shm2 = shmem_bytes()
        for e in exps:
            e.finish()
    finally:
        c.shutdown_local_collectors()
        c.rmtree_quiet(rings)
        c.rmtree_quiet(tmp)
    n = max(args.runs, 1)
    rows = [["idle (after start)", f"{sum(idle) / n / 1024:,.1f} KiB", f"{max(idle, default=0) / 1024:,.1f} KiB",
             f"{(shm1 - shm0) / n / 1024:,.1f} KiB"],
            [f"after {args.points:,} points", f"{sum(logged) / n / 1024:,.1f} KiB",
             f"{max(logged, default=0) / 1024:,.1f} KiB", f"{(shm2 - shm0) / n / 1024:,.1f} KiB"]]
    print(f"{args.runs} runs in one process; {c.machine_line()}")
    print(c.table(rows, ["ring per run", "mean (st_blocks)", "max (st_blocks)", "Shmem change / run"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
