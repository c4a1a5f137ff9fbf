"""The collector's hardware sampler: CPU cost at a 1 s interval, 8 GPUs, 8 rank processes.

The GPUs are the fake NVML of the tests (tests/fake_nvml.py), so this measures expman's
own work (host and process reads through psutil, NVML calls through a Python stand-in,
attribution, rows, Parquet parts), not the NVIDIA driver's. The 8 ranks are real child
processes (sleeping interpreters), each listed by the fake NVML on its own GPU.

  sampler    a HardwareMonitor in this process, one run with 8 ranks. Reports each
             sample's wall time and CPU time (p50 / p99 / max; the sample is the sources,
             attribution and rows), the Parquet flushes, and the sampler thread's CPU time
             over the whole window (/proc/self/task/<tid>/stat) as % of one core.
  collector  a real `python -m expman.collector`: its process CPU % while idle, then while
             sampling the same 8 ranks (hello frames with log_hardware=True); the
             difference is what sampling costs the collector.

    python benchmarks/bench_hardware.py                    # both, 30 s each
    python benchmarks/bench_hardware.py --mode sampler --seconds 60
    python benchmarks/bench_hardware.py --real-nvml        # on a GPU host: the real driver
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # fake_nvml

import _common as c  # noqa: E402

TARGET_CPU_PERCENT = 1.0
GPUS = 8
RANKS = 8
FAKE_NVML = str(HERE.parent / "tests" / "fake_nvml.py")
TICKS = os.sysconf("SC_CLK_TCK")


def start_ranks(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([c.PYTHON, "-c", "import time; time.sleep(3600)"], stdin=subprocess.DEVNULL)
            for _ in range(n)]


def stop_ranks(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        c.stop_process(p, 5)


def gpu_config(pids: list[int]) -> list[dict[str, Any]]:
    from fake_nvml import gpu

    return [gpu(i, processes=[{"pid": pids[i % len(pids)], "memory": (4 + i) * 2**30}]) for i in range(GPUS)]


def thread_cpu_s(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def hello(run: str, rank: int, host: str, pid: int, interval: float) -> Any:
    from expman._wire.frames import Frame

    return Frame("hello", run, host, rank, "bench", rank, time.time(),
                 {"log_hardware": True, "hardware_interval": interval, "pid": pid, "local_rank": rank})


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_sampler(seconds: float, interval: float, real_nvml: bool) -> dict[str, Any]:
    from expman.collector import _hardware as hw
    from expman.collector._hardware_store import HardwareStore
    from fake_nvml import FakeNvml

    import expman
    from expman._storage.layout import write_yaml_atomic

    tmp = c.make_tmpdir("hw")
    ranks = start_ranks(RANKS)
    samples: list[tuple[float, float]] = []  # (wall s, thread CPU s) per sample
    flushes: list[tuple[float, float]] = []
    original_sample, original_flush = hw.HardwareMonitor._sample, HardwareStore.flush

    def timed_sample(self: Any, *args: Any) -> None:
        w, t = time.perf_counter(), time.thread_time()
        original_sample(self, *args)
        samples.append((time.perf_counter() - w, time.thread_time() - t))

    def timed_flush(self: Any) -> None:
        w, t = time.perf_counter(), time.thread_time()
        original_flush(self)
        flushes.append((time.perf_counter() - w, time.thread_time() - t))

    hw.HardwareMonitor._sample = timed_sample  # type: ignore[method-assign]
    HardwareStore.flush = timed_flush  # type: ignore[method-assign]
    try:
        run_dir = tmp / "root" / "bench" / "hw-b0000000"
        run_dir.mkdir(parents=True)
        write_yaml_atomic(run_dir / "run.yaml", {"id": "b0000000"})
        nvml = None if real_nvml else FakeNvml(gpu_config([p.pid for p in ranks]))
        monitor = hw.HardwareMonitor(tmp / "root", nvml=nvml, interval=interval)
        for rank, proc in enumerate(ranks):
            monitor.hello(hello("b0000000", rank, monitor.host, proc.pid, interval), run_dir)
        assert monitor._thread is not None
        c.wait_until(lambda: len(samples) >= 2, 10)  # past start-up: NVML open, first sample, first part
        tid = monitor._thread.native_id
        cpu0, wall0, n0 = thread_cpu_s(tid), time.perf_counter(), len(samples)
        time.sleep(seconds)
        cpu1, wall1, n1 = thread_cpu_s(tid), time.perf_counter(), len(samples)
        monitor.close()
        table = expman.open_run(run_dir).hardware()
    finally:
        hw.HardwareMonitor._sample = original_sample  # type: ignore[method-assign]
        HardwareStore.flush = original_flush  # type: ignore[method-assign]
        stop_ranks(ranks)
        c.rmtree_quiet(tmp)
    window = samples[n0:n1]
    keys = table["key"].to_pylist()
    return {
        "seconds": wall1 - wall0,
        "samples": len(window),
        "rows_per_sample": table.num_rows / max(1, len(samples)),
        "gpu_devices": len({d for d, k in zip(table["device"].to_pylist(), keys) if k == "gpu.name"}),
        "process_ranks": sorted({r for r, k in zip(table["rank"].to_pylist(), keys) if k == "process.rss_bytes"}),
        "wall_ms": {q: pct([w for w, _ in window], v) * 1e3 for q, v in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "cpu_ms": {q: pct([t for _, t in window], v) * 1e3 for q, v in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "flushes": len(flushes),
        "flush_cpu_ms_p50": pct([t for _, t in flushes], 0.5) * 1e3 if flushes else 0.0,
        "thread_cpu_percent": 100 * (cpu1 - cpu0) / (wall1 - wall0),
    }


def run_collector(seconds: float, interval: float, real_nvml: bool) -> dict[str, Any]:
    import psutil
    import zmq

    from expman._wire import frames as proto
    from expman._env import hostname

    tmp = c.make_tmpdir("hwc")
    ranks = start_ranks(RANKS)
    config = tmp / "gpus.json"
    config.write_text(json.dumps({"gpus": gpu_config([p.pid for p in ranks])}))
    env = dict(os.environ) if real_nvml else {**os.environ, "EXPMAN_NVML_MODULE": FAKE_NVML, "EXPMAN_FAKE_NVML": str(config)}
    ready, sock_path = tmp / "ready.yaml", tmp / "c.sock"
    proc = subprocess.Popen([c.PYTHON, "-m", "expman.collector", "--root", str(tmp / "root"), "--bind", f"ipc://{sock_path}",
                             "--ready-file", str(ready), "--log-level", "WARNING", "--heartbeat-timeout", "36000"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        if not c.wait_until(ready.exists, 30, 0.01):
            raise RuntimeError("the collector did not start")
        collector = psutil.Process(proc.pid)
        dealer.connect(f"ipc://{sock_path}")
        time.sleep(1.0)  # settle after start-up

        def cpu_percent_over(s: float) -> float:
            t0, w0 = collector.cpu_times(), time.perf_counter()
            time.sleep(s)
            t1, w1 = collector.cpu_times(), time.perf_counter()
            return 100 * ((t1.user - t0.user) + (t1.system - t0.system)) / (w1 - w0)

        idle = cpu_percent_over(seconds)
        for rank, rank_proc in enumerate(ranks):
            body = {"experiment": "bench", "name": "hw", "dir": "hw-c0000000", "world_size": RANKS, "pid": rank_proc.pid,
                    "log_hardware": True, "hardware_interval": interval, "local_rank": rank}
            dealer.send(proto.encode_frame("hello", run="c0000000", host=hostname(), rank=rank, sender="bench", seq=rank,
                                           sent_at=time.time(), body=body))
        c.wait_until(lambda: any((tmp / "root" / "bench" / "hw-c0000000" / "hardware").glob("*.parquet")), 15, 0.05)
        time.sleep(2.0)  # past NVML start-up and the first part
        sampling = cpu_percent_over(seconds)
    finally:
        dealer.close(0)
        c.stop_process(proc)
        stop_ranks(ranks)
        c.rmtree_quiet(tmp)
    return {"seconds": seconds, "idle_cpu_percent": idle, "sampling_cpu_percent": sampling,
            "sampling_cost_percent": sampling - idle}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("sampler", "collector", "all"), default="all")
    p.add_argument("--seconds", type=float, default=30.0, help="measuring window per case (default 30)")
    p.add_argument("--interval", type=float, default=1.0, help="sampling interval (default 1 s)")
    p.add_argument("--real-nvml", action="store_true", help="sample this host's real GPUs through pynvml")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    gpus = "this host's real GPUs" if args.real_nvml else f"{GPUS} fake GPUs"
    print(f"== hardware sampler: {gpus}, {RANKS} rank processes, {args.interval:g} s interval; "
          f"machine: {c.machine_line()}", flush=True)
    out: dict[str, Any] = {}
    if args.mode in ("sampler", "all"):
        r = out["sampler"] = run_sampler(args.seconds, args.interval, args.real_nvml)
        print(f"   sampler thread, {r['seconds']:.0f} s, {r['samples']} samples "
              f"({r['rows_per_sample']:.0f} rows each; {r['gpu_devices']} GPUs, ranks {r['process_ranks']}):")
        print(f"     one sample: wall p50 {r['wall_ms']['p50']:.2f} ms, p99 {r['wall_ms']['p99']:.2f} ms, "
              f"max {r['wall_ms']['max']:.2f} ms; CPU p50 {r['cpu_ms']['p50']:.2f} ms, p99 {r['cpu_ms']['p99']:.2f} ms")
        print(f"     Parquet parts: {r['flushes']} written, CPU p50 {r['flush_cpu_ms_p50']:.2f} ms each")
        ok = r["thread_cpu_percent"] <= TARGET_CPU_PERCENT
        print(f"     sampler thread CPU: {r['thread_cpu_percent']:.2f} % of one core "
              f"(target <= {TARGET_CPU_PERCENT:g} %: {c.verdict(ok)})", flush=True)
    if args.mode in ("collector", "all"):
        r = out["collector"] = run_collector(args.seconds, args.interval, args.real_nvml)
        ok = r["sampling_cost_percent"] <= TARGET_CPU_PERCENT
        print(f"   collector process, {r['seconds']:.0f} s per phase: idle {r['idle_cpu_percent']:.2f} % CPU, "
              f"sampling {r['sampling_cpu_percent']:.2f} % -> sampling costs {r['sampling_cost_percent']:.2f} % of one core "
              f"(target <= {TARGET_CPU_PERCENT:g} %: {c.verdict(ok)})", flush=True)
    c.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
