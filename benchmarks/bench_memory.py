"""Rank-side memory: what `import expman` costs and what an open experiment adds.

Each measurement runs in a fresh interpreter that imports nothing but sys/os/time
before it measures, so the numbers are clean:
  import    RSS and wall time of `import expman`; which heavy modules it pulled in
  open      RSS after start_experiment (local collector, which is a separate process and
            not counted) + logging --points points and waiting until they are acknowledged;
            the overhead is that minus the RSS after `import expman`
  stalled   the same with a collector endpoint where nothing listens, logging
            --stalled-points points: how far the rank's memory grows while it cannot deliver
Also lists the slowest imports under `import expman` (python -X importtime).

    python benchmarks/bench_memory.py --points 5000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

WATCH = ("pyarrow", "textual", "numpy", "psutil", "pynvml", "cryptography", "yaml", "zmq", "msgpack", "rich")

# Runs in a fresh interpreter; only sys/os/time before the first measurement.
CHILD = r'''
import sys, os, time
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
WATCH = %(watch)r
out = {"rss_bare": rss(), "modules_bare": len(sys.modules)}
t0 = time.perf_counter()
import expman
out["import_s"] = time.perf_counter() - t0
out["rss_import"] = rss()
out["modules_import"] = len(sys.modules)
out["heavy_after_import"] = {m: m in sys.modules for m in WATCH}
mode, points, tmp = %(mode)r, %(points)d, %(tmp)r
if mode == "open":
    exp = expman.start_experiment("bench", "memory", root=os.path.join(tmp, "root"))
else:
    os.mkdir(os.path.join(tmp, "nothing"))
    exp = expman.start_experiment("bench", "memory", root=os.path.join(tmp, "root"),
                                  collector="ipc://" + os.path.join(tmp, "nothing", "x.sock"))
out["rss_started"] = rss()
keys = ["loss", "acc", "lr", "grad_norm", "tokens_per_s"]
for i in range(points):
    exp.log_metric(keys[i %% 5], i * 0.001, step=i // 5)
deadline = time.monotonic() + 30
if mode == "open":
    while exp.stats()["acked"] < points and time.monotonic() < deadline:
        time.sleep(0.01)
else:
    time.sleep(0.3)  # let the sender pack what it holds into frames
out["stats"] = exp.stats()
out["rss_logged"] = rss()
out["heavy_after_logging"] = {m: m in sys.modules for m in WATCH}
out["threads"] = __import__("threading").active_count()
ok = exp.finish(timeout=30 if mode == "open" else 0.5)
out["finish_confirmed"] = ok
out["rss_finished"] = rss()
print("@@" + __import__("json").dumps(out))
'''


def run_child(mode: str, points: int) -> dict[str, Any]:
    tmp = c.make_tmpdir(f"mem-{mode}")
    try:
        code = CHILD % {"watch": WATCH, "mode": mode, "points": points, "tmp": str(tmp)}
        proc = subprocess.run([c.PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("@@")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory child ({mode}) failed: rc {proc.returncode}\n{proc.stderr[-3000:]}")
        return json.loads(line[2:])
    finally:
        c.rmtree_quiet(tmp)


def slowest_imports(top: int = 8) -> list[tuple[float, str]]:
    proc = subprocess.run([c.PYTHON, "-X", "importtime", "-c", "import expman"], capture_output=True, text=True,
                          timeout=60)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        try:
            _, rest = line.split(":", 1)
            _self_us, cum_us, name = rest.split("|")
            rows.append((int(cum_us) / 1e3, name.rstrip()))
        except ValueError:
            continue
    rows.sort(reverse=True)
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=5000, help="points logged with a live collector (default 5000)")
    p.add_argument("--stalled-points", type=int, default=1_000_000,
                   help="points logged while nothing listens (default 1000000; 0 skips)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    mb = 2**20
    r = {"open": run_child("open", args.points)}
    if args.stalled_points:
        r["stalled"] = run_child("stalled", args.stalled_points)
    r["slowest_imports"] = slowest_imports()
    o = r["open"]
    r["import_mb"] = (o["rss_import"] - o["rss_bare"]) / mb
    r["overhead_mb"] = (o["rss_logged"] - o["rss_import"]) / mb
    r["heavy_imported"] = sorted(m for m in ("pyarrow", "textual") if o["heavy_after_import"][m])
    r["heavy_after_logging"] = sorted(m for m in ("pyarrow", "textual") if o["heavy_after_logging"][m])
    print("\n== rank-side memory (fresh interpreters; RSS from /proc/self/status)")
    print(f"   bare interpreter: {o['rss_bare'] / mb:.1f} MB, {o['modules_bare']} modules")
    print(f"   import expman: +{r['import_mb']:.1f} MB RSS, {o['import_s'] * 1e3:.0f} ms, "
          f"+{o['modules_import'] - o['modules_bare']} modules")
    print("   in sys.modules after import expman: "
          + ", ".join(f"{m}={'yes' if v else 'no'}" for m, v in o["heavy_after_import"].items()))
    print(f"   pyarrow or textual imported by `import expman`: "
          f"{'NO (good)' if not r['heavy_imported'] else 'YES: ' + ', '.join(r['heavy_imported'])}; "
          f"after start_experiment + logging: "
          f"{'none' if not r['heavy_after_logging'] else ', '.join(r['heavy_after_logging'])}")
    print(f"   start_experiment (local collector, a separate process): +{(o['rss_started'] - o['rss_import']) / mb:.1f} MB; "
          f"after logging {args.points:,} points and their acknowledgement: "
          f"+{r['overhead_mb']:.1f} MB over `import expman` "
          f"(target <= {c.TARGET_RANK_OVERHEAD_MB} MB: {c.verdict(r['overhead_mb'] <= c.TARGET_RANK_OVERHEAD_MB)}); "
          f"acked {o['stats']['acked']:,}; threads {o['threads']}")
    if "stalled" in r:
        s = r["stalled"]
        grow = (s["rss_logged"] - s["rss_import"]) / mb
        r["stalled_mb"] = grow
        print(f"   nothing listening, {args.stalled_points:,} points held: +{grow:.1f} MB over `import expman` "
              f"({grow * mb / args.stalled_points:.0f} bytes/point; buffered {s['stats']['buffered']:,}, "
              f"dropped {s['stats']['dropped']:,}); memory is capped by the sender's max_pending_bytes")
    print("   slowest imports under `import expman` (cumulative ms): "
          + ", ".join(f"{name.strip()} {ms:.0f}" for ms, name in r["slowest_imports"]))
    c.write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
