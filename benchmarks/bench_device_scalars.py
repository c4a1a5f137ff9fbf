"""Step time of a GPU training loop that logs 100 CUDA scalars per step, three ways.

    python benchmarks/bench_device_scalars.py                 # on a host with a CUDA GPU
    python benchmarks/bench_device_scalars.py --steps 300 --scalars 100

- none:   the step alone (matmuls queued on the GPU), nothing logged
- float:  `float(t)` per scalar, what most trackers do: one device sync per metric
- expman: `exp.log_metrics({...})` with the tensors themselves (held, read in batches by
          the sender without a sync; docs/architecture.md, "Device tensors")

Prints the time per step of each (GPU work included) and expman's overhead over `none` (target: within 2%).
Without CUDA it says so and exits 0 (CI machines have no GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--scalars", type=int, default=100, help="CUDA scalars logged per step")
    p.add_argument("--size", type=int, default=2048, help="matrix size of the step's work")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device on this machine; run this on a GPU host")
        return 0
    import expman

    a = torch.randn(args.size, args.size, device="cuda")
    b = torch.randn(args.size, args.size, device="cuda")

    def step() -> dict[str, torch.Tensor]:
        c = a @ b
        for _ in range(3):
            c = torch.tanh(c @ b)
        return {f"layer{i}.grad_norm": c[i % args.size, 0].abs() for i in range(args.scalars)}

    def timed(log) -> float:  # noqa: ANN001
        """Seconds per step, GPU work included (the clock stops after a final sync)."""
        for _ in range(20):  # warm up
            log(step(), -1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(args.steps):
            log(step(), s)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    results = {"none": timed(lambda metrics, s: None)}
    floats: list[float] = []
    results["float"] = timed(lambda metrics, s: floats.extend(float(t) for t in metrics.values()))
    with tempfile.TemporaryDirectory() as root, expman.start_experiment("bench", "device", root=root) as exp:
        results["expman"] = timed(lambda metrics, s: exp.log_metrics(metrics, step=s))
    base = results["none"]
    print(f"{torch.cuda.get_device_name()}; {args.scalars} CUDA scalars per step, {args.steps} steps")
    for name, seconds in results.items():
        print(f"{name:>7}: {seconds * 1e3:8.3f} ms per step  ({(seconds / base - 1) * 100:+.1f}% over none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
