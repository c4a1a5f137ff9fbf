"""Shared helpers for the expman benchmarks (not part of the library).

Everything here is deliberately dependency-light: the rank-side numbers must not be
polluted by what the benchmark itself imports.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable

# Targets from the brief (docs: benchmarks/README.md).
TARGET_P50_NS = 400
TARGET_P99_NS = 2_000
TARGET_MAX_NS = 1_000_000
TARGET_E2E_POINTS_PER_S = 2_000_000
TARGET_COLLECTOR_RSS_MB = 200
TARGET_RANK_OVERHEAD_MB = 20


# --- temp dirs ------------------------------------------------------------------------
def make_tmpdir(tag: str) -> Path:
    """A unique, short temp dir (ipc:// paths must stay under ~100 bytes)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix=f"expman-bench-{tag}-", dir=base))


def rmtree_quiet(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- latency statistics ---------------------------------------------------------------
def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/p99.9/max (ns) of a list of per-call durations; sorts in place."""
    samples_ns.sort()
    n = len(samples_ns)

    def q(frac: float) -> int:
        return samples_ns[min(n - 1, int(frac * n))]

    return {
        "n": n,
        "p50": q(0.50),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": samples_ns[-1],
        "mean": sum(samples_ns) / n,
        "over_1ms": n - bisect.bisect_right(samples_ns, 1_000_000),
        "over_10us": n - bisect.bisect_right(samples_ns, 10_000),
    }


class _Empty:
    """The floor: an empty method with the same signature shape as log_metric."""

    def log_metric(self, key: str, value: Any, step: int | None = None, timestamp: Any = None,
                   created_at: Any = None) -> None:
        pass

    def log_metrics(self, metrics: Any, step: int | None = None, timestamp: Any = None) -> None:
        pass


def time_log_metric(log_metric: Callable[..., None], n: int, values: list[float]) -> list[int]:
    """perf_counter_ns around each `log_metric("loss", v, step=i)`; preallocated results."""
    res = [0] * n
    pc = time.perf_counter_ns
    for i in range(n):
        v = values[i]
        t0 = pc()
        log_metric("loss", v, step=i)
        res[i] = pc() - t0
    return res


def time_log_metrics(log_metrics: Callable[..., None], n: int, dicts: list[dict]) -> list[int]:
    res = [0] * n
    pc = time.perf_counter_ns
    m = len(dicts)
    for i in range(n):
        d = dicts[i % m]
        t0 = pc()
        log_metrics(d, step=i)
        res[i] = pc() - t0
    return res


def throughput_log_metric(log_metric: Callable[..., None], n: int, values: list[float]) -> float:
    """Calls per second of an untimed loop (no per-call timer)."""
    t0 = time.perf_counter()
    for i in range(n):
        log_metric("loss", values[i], step=i)
    return n / (time.perf_counter() - t0)


def floor_stats(n: int, values: list[float]) -> dict[str, Any]:
    """The same timing loop around an empty Python method (timer overhead included)."""
    empty = _Empty()
    stats = percentiles(time_log_metric(empty.log_metric, n, values))
    stats["calls_per_s"] = throughput_log_metric(empty.log_metric, n, values)
    res = [0] * n
    pc = time.perf_counter_ns
    for i in range(n):
        t0 = pc()
        res[i] = pc() - t0
    stats["timer_only_p50"] = percentiles(res)["p50"]
    return stats


# --- processes -------------------------------------------------------------------------
def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS from /proc (no psutil needed)."""
    return _proc_status_kb(pid, "VmRSS") * 1024


def hwm_bytes(pid: int | str = "self") -> int:
    """VmHWM (peak RSS) from /proc."""
    return _proc_status_kb(pid, "VmHWM") * 1024


def _proc_status_kb(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def find_collector_child() -> Any:
    """The local-mode collector: our child whose cmdline contains expman.collector."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if any("expman.collector" in part for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


class RssSampler:
    """Samples a process's RSS every `interval` s from a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            if rss > self.peak:
                self.peak = rss
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2.0)
        return self.peak


class ExternalCollector:
    """`python -m expman.collector` started by the benchmark, for SIGSTOP/SIGCONT cases."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.sock = workdir / "c.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.ready = workdir / "ready.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    def start(self, timeout: float = 30.0) -> ExternalCollector:
        cmd = [PYTHON, "-m", "expman.collector", "--root", str(self.root), "--bind", self.endpoint,
               "--ready-file", str(self.ready), "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited with code {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("collector did not write its ready file in time")
            time.sleep(0.01)
        return self

    def sigstop(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        if self.proc is not None and self.stopped:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.stopped = False

    def close(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None
        self.stopped = False


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int | None:
    """SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, then SIGKILL after `timeout`; the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def shutdown_local_collectors(timeout: float = 15.0) -> None:
    """Stop the private collectors that start_experiment() spawned (atexit would, too).

    Uses the library's own shutdown where it has one; then terminates any collector
    child that is still there (SIGCONT first, in case a benchmark stopped it).
    """
    from expman._rank import start as _api

    for name in ("shutdown", "_shutdown_local_collectors"):
        fn = getattr(_api, name, None)
        if fn is not None:
            try:
                fn()
            except Exception as exc:  # the benchmark must still clean up
                print(f"   (expman {name}() raised {exc!r}; terminating collectors directly)")
            break
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if not any("expman.collector" in part for part in child.cmdline()):
                continue
            child.send_signal(signal.SIGCONT)
            child.terminate()
            child.wait(timeout)
        except psutil.TimeoutExpired:
            child.kill()
        except psutil.Error:
            pass


# --- running the scripts as children ------------------------------------------------------
def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    """Run `python <args> --json FILE`; stream its output; return the JSON it wrote."""
    fd, path = tempfile.mkstemp(prefix="expman-bench-", suffix=".json")
    os.close(fd)
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # keep the children's stdout and stderr in order
        proc = subprocess.run([PYTHON, *args, "--json", path], timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}")
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    finally:
        os.unlink(path)


def write_json(path: str | None, data: Any) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)


def fmt_ns(ns: float) -> str:
    if ns >= 1_000_000:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1_000:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def machine_line() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({model or 'unknown CPU'}), Python {sys.version.split()[0]}, {sys.platform}, "
            f"load average {load}")


def table(rows: Iterable[list[str]], header: list[str]) -> str:
    rows = [header, *rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def synthetic_points(points: int, names: list[str], ranks: int,
                     time_us: Callable[[Any, Any], Any]) -> Iterable[Any]:
    """A finished run's points in the storage schema, 1 M rows a table: keys cycle fastest,
    then ranks, then steps; values a decaying loss with noise; `time_us(i, step)` gives
    each row's microseconds past a fixed epoch (numpy arrays in, numpy array out)."""
    import numpy as np
    import pyarrow as pa

    from expman._storage.layout import metrics_schema

    schema = metrics_schema()
    keys = len(names)
    per_step = keys * ranks
    rng = np.random.default_rng(0)
    for lo in range(0, points, 1 << 20):
        i = np.arange(lo, min(points, lo + (1 << 20)))
        step = i // per_step
        value = np.exp(-3 * step / (points / per_step)) + 0.1 * rng.random(len(i))
        yield pa.Table.from_arrays([
            pa.DictionaryArray.from_arrays(pa.array((i % keys).astype(np.int32)), pa.array(names)),
            pa.array(value), pa.nulls(len(i), pa.string()), pa.array(step),
            pa.array(((i // keys) % ranks).astype(np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(i), np.int32)), pa.array(["node01"])),
            pa.array(1_795_000_000_000_000 + time_us(i, step)).cast(pa.timestamp("us", tz="UTC")),
        ], schema=schema)
