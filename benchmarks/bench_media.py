"""What media cost the training loop: `log_image` of a 512x512x3 uint8 image, and
`log_metric` while images are logged at 10/s.

A simulated training loop with 100 ms steps: each step optionally logs one image (timed
call by call), then makes `--metric-calls` timed `log_metric` calls at once (when the
background threads are busiest with the image: hashing, chunking, sending), then spins
in pure Python until the step is over (training code that holds the GIL). Run once
without images (the baseline) and once with them. Then a burst of back-to-back
`log_image` calls (within the in-memory budget). Finally every image is checked to have
landed, and the collector's encoding of one such image is timed in this process.

    python benchmarks/bench_media.py                 # ~40 s
    python benchmarks/bench_media.py --seconds 5 --burst 20
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

STEP_S = 0.1


def _loop(exp: Any, steps: int, metric_calls: int, images: list[Any] | None) -> tuple[list[int], list[int]]:
    pc = time.perf_counter_ns
    image_ns: list[int] = []
    metric_ns = [0] * (steps * metric_calls)
    log_metric, log_image = exp.log_metric, exp.log_image
    n = 0
    for step in range(steps):
        end = time.perf_counter() + STEP_S
        if images is not None:
            t0 = pc()
            log_image("samples", images[step % len(images)], step=step)
            image_ns.append(pc() - t0)
        for i in range(metric_calls):
            t0 = pc()
            log_metric("loss", 0.5, step=n)
            metric_ns[n] = pc() - t0
            n += 1
        while time.perf_counter() < end:  # training code holding the GIL
            pass
    return image_ns, metric_ns


def _encode_ms(image: Any, repeats: int = 5) -> float:
    """The collector's work for one image (PNG), timed here: median of `repeats`."""
    from expman.collector._media import encode

    desc = {"kind": "image", "key": "x", "encoding": "raw", "dtype": "uint8", "shape": list(image.shape),
            "layout": "HWC"}
    payload = image.tobytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode(desc, payload)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each loop (baseline, with images)")
    ap.add_argument("--metric-calls", type=int, default=5000, help="timed log_metric calls per 100 ms step")
    ap.add_argument("--burst", type=int, default=60, help="back-to-back log_image calls (60 x 768 KiB fits in memory)")
    args = ap.parse_args(argv)

    import numpy as np

    import expman

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(8)]  # noise: the slowest PNG
    steps = max(1, int(args.seconds / STEP_S))
    tmp = c.make_tmpdir("media")
    try:
        exp = expman.start_experiment("bench", "media", root=tmp / "root", code_dir=False)
        for i in range(1000):
            exp.log_metric("warm", 0.0, step=i)
        exp.log_image("warm", images[0], step=0)
        gc.collect()
        _, base = _loop(exp, steps, args.metric_calls, None)
        gc.collect()
        image_ns, with_images = _loop(exp, steps, args.metric_calls, images)
        c.wait_until(lambda: exp.stats()["artifacts_pending"] == 0, timeout=120)
        gc.collect()
        burst = []
        pc = time.perf_counter_ns
        for i in range(args.burst):
            t0 = pc()
            exp.log_image("burst", images[i % len(images)], step=i)
            burst.append(pc() - t0)
        t0 = time.perf_counter()
        ok = exp.finish(timeout=300)
        drain_s = time.perf_counter() - t0
        stats = exp.stats()
        run = expman.open_run(exp.run_dir)
        landed = run.media(["samples", "burst"]).num_rows
        exact = np.array_equal(run.read_media("samples", step=3, as_="numpy"), images[3])
    finally:
        c.shutdown_local_collectors()
        c.rmtree_quiet(tmp)
    pi, pb, pm, pbase = (c.percentiles(x) for x in (image_ns, burst, with_images, base))
    encode_ms = _encode_ms(images[0])
    print(c.machine_line())
    rows = [
        ["log_image 512x512x3 uint8, 1 per 100 ms step", str(pi["n"]), c.fmt_ns(pi["p50"]), c.fmt_ns(pi["p99"]),
         c.fmt_ns(pi["max"])],
        [f"log_image, {args.burst} back to back", str(pb["n"]), c.fmt_ns(pb["p50"]), c.fmt_ns(pb["p99"]),
         c.fmt_ns(pb["max"])],
        ["log_metric, no images (baseline)", str(pbase["n"]), c.fmt_ns(pbase["p50"]), c.fmt_ns(pbase["p99"]),
         c.fmt_ns(pbase["max"])],
        ["log_metric, images at 10/s", str(pm["n"]), c.fmt_ns(pm["p50"]), c.fmt_ns(pm["p99"]), c.fmt_ns(pm["max"])],
    ]
    print(c.table(rows, ["call", "n", "p50", "p99", "max"]))
    print(f"collector: PNG encoding of one 512x512x3 noise image {encode_ms:.1f} ms (Pillow, compress_level=1)")
    print(f"finish() drained the burst in {drain_s:.2f} s; stored {stats['artifacts_stored']}, "
          f"failed {stats['artifacts_failed']}; index rows {landed} of {steps + args.burst}; "
          f"pixel-exact read back: {exact}")
    good = ok and landed == steps + args.burst and exact and stats["artifacts_failed"] == 0
    print("data check:", "ok" if good else "FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
