"""Distributed: many rank processes log as fast as they can into one run; read it back.

Two set-ups (issue 3), each with its own freshly started collector(s) and run:
  single  one `python -m expman.collector` on an ipc:// socket; --ranks rank processes
          (default 8) connect to it with EXPMAN_COLLECTOR, and all share one run through
          EXPMAN_RUN_ID / EXPMAN_RANK / EXPMAN_WORLD_SIZE, as a launcher would set them.
  relay   two "hosts": a head collector (ipc + tcp) that writes the run, and a relay
          collector (`--forward tcp://HEAD:PORT`) on the other host; half the ranks on
          each, every rank on its own host's ipc socket. The hosts are network namespaces
          joined by a veth pair when running as root and `ip netns` works (frames really
          cross an interface), else distinct loopback addresses (127.0.0.2 / 127.0.0.3).
and two loops per rank:
  metric   `exp.log_metric("loss", v, step=i)`, --points times
  metrics  `exp.log_metrics({8 keys}, step=i)`, --points / 8 times

Every rank starts, waits until the collector has answered its hello, says "ready", and
waits for "go" on stdin, so interpreter and collector start-up are not counted.
Reported per set-up and loop:
- aggregate points/s: all points / (first rank's first log call -> last rank's finish()
  returned); finish() returns once the collector has persisted every point (WAL, then
  Parquet). Also collector-side: rows the collector counted / its busy window (first to
  last 20 ms sample, after "go", in which it used CPU, capped at the last finish()), and
  rows per collector CPU-second (what one fully used core of collector would sustain).
- per rank: logging-loop rate and first-call -> finish() rate (p50 / p99 / min over
  ranks), and the per-chunk rate (4096 points timed together) p50 / p99 / worst, which
  shows time spent waiting for a core.
- points lost: read back with `expman.open_run(dir).metrics()`; for every rank (and key)
  the steps must be exactly 0..n-1, each once (count, distinct count, min, max), values
  must match what that rank logged, and the relay set-up checks each rank's host.
- collector peak RSS (VmHWM from /proc, and sampled every 20 ms), collector CPU seconds,
  ranks' CPU seconds, and the CPU use of the machine during the run, which is what limits
  the figures on a small machine.

    python benchmarks/bench_distributed.py                        # 8 ranks x 500k, both set-ups and loops
    python benchmarks/bench_distributed.py --setup single --mode metrics --ranks 4 --points 1000000

Exit status 1 if a data check fails (a point lost, duplicated or changed).
"""

from __future__ import annotations

import json
import os
import sys
import time

CHUNK = 4096  # points timed together in a rank's loop
KEYS = 8
VALUE_OFFSET = 1e9  # rank r logs value step + r * VALUE_OFFSET (exact in float64)


# --- the rank process -------------------------------------------------------------------
def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads: the main (training) thread, ZeroMQ's own
    threads (named ZMQbg/...), and the rest (expman's sender thread)."""
    out = {"main": 0.0, "zmq": 0.0, "other": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    pid = os.getpid()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        kind = "main" if int(tid) == pid else "zmq" if comm.startswith("ZMQbg") else "other"
        out[kind] += cpu
    return out


def worker(argv: list[str]) -> int:
    """`bench_distributed.py --worker MODE POINTS ROOT`: one rank (identity from EXPMAN_*)."""
    mode, points, root = argv[0], int(argv[1]), argv[2]
    import expman

    exp = expman.start_experiment("bench", "dist", root=root)
    deadline = time.monotonic() + 60
    while not (exp._channel.hello_sent and exp.stats()["unacked_frames"] == 0):  # the collector (or the head) answered the hello
        if time.monotonic() > deadline:
            print(json.dumps({"error": "the collector never answered the hello"}), flush=True)
            exp.finish(timeout=2)
            return 2
        time.sleep(0.005)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        exp.finish("killed", timeout=5)
        return 3
    base = exp.rank * VALUE_OFFSET
    chunks: list[int] = []
    pc = time.perf_counter_ns
    threads0 = thread_cpu()
    cpu0 = os.times()
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes on one machine
    if mode == "metric":
        lm = exp.log_metric
        logged = points
        for start in range(0, points, CHUNK):
            c0 = pc()
            for i in range(start, min(start + CHUNK, points)):
                lm("loss", i + base, step=i)
            chunks.append(pc() - c0)
    else:
        n0, n1, n2, n3, n4, n5, n6, n7 = (f"layer{k}/grad_norm" for k in range(KEYS))
        lms = exp.log_metrics
        steps = points // KEYS
        logged = steps * KEYS
        per = CHUNK // KEYS
        for start in range(0, steps, per):
            c0 = pc()
            for i in range(start, min(start + per, steps)):
                v = i + base
                lms({n0: v, n1: v, n2: v, n3: v, n4: v, n5: v, n6: v, n7: v}, step=i)
            chunks.append(pc() - c0)
    t1 = time.perf_counter()
    stats_loop = exp.stats()
    confirmed = exp.finish(timeout=120)
    t2 = time.perf_counter()
    cpu2 = os.times()
    threads = thread_cpu()
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as fh:
        hwm_kb = next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    out = {
        "rank": exp.rank, "run_dir": str(exp.run_dir), "logged": logged, "t0": t0, "t1": t1, "t2": t2,
        "cpu_s": (cpu2.user - cpu0.user) + (cpu2.system - cpu0.system), "chunks_ns": chunks,
        "last_chunk_points": logged - (len(chunks) - 1) * CHUNK if chunks else 0,
        "confirmed": confirmed, "stats_loop": stats_loop, "stats_end": exp.stats(), "peak_rss_mb": hwm_kb / 1024,
        "threads_cpu_s": {k: threads.get(k, 0.0) - threads0.get(k, 0.0) for k in threads},
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.exit(worker(sys.argv[2:]))


# --- the benchmark (parent) ---------------------------------------------------------------
import argparse  # noqa: E402
import ast  # noqa: E402
import atexit  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

MODES = {"metric": "log_metric loop", "metrics": "log_metrics, 8 keys per step"}
SETUPS = {"single": "one collector", "relay": "two hosts: head + relay collector"}
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Host:
    name: str
    address: str
    prefix: list[str]  # runs a program "on" this host (ip netns exec NS), or nothing


def _ip(*args: str) -> bool:
    return subprocess.run(["ip", *args], capture_output=True).returncode == 0


class TwoHosts:
    """Namespaces emb-<tag>-a/-b with 10.214.<n>.1/.2 on a veth pair (as tests/test_multihost.py
    does, other names and subnet), else 127.0.0.2 / 127.0.0.3. close() removes what it made."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.links: list[str] = []
        self.namespaces = False
        self.why_not = ""

    def open(self) -> tuple[Host, Host]:
        tag = uuid.uuid4().hex[:6]
        a, b = f"emb-{tag}-a", f"emb-{tag}-b"
        va, vb = f"vb{tag}a", f"vb{tag}b"
        net = f"10.214.{int(tag[:2], 16)}"
        if os.geteuid() != 0:
            self.why_not = "not root"
        elif not _ip("netns", "add", a):
            self.why_not = "`ip netns add` failed"
        else:
            self.made.append(a)
            ok = _ip("netns", "add", b)
            if ok:
                self.made.append(b)
                ok = _ip("link", "add", va, "type", "veth", "peer", "name", vb)
            if ok:
                self.links.append(va)  # in the root namespace until moved; deleted in close() if still here
                ok = (_ip("link", "set", va, "netns", a) and _ip("link", "set", vb, "netns", b)
                      and _ip("-n", a, "addr", "add", f"{net}.1/30", "dev", va)
                      and _ip("-n", b, "addr", "add", f"{net}.2/30", "dev", vb)
                      and all(_ip("-n", ns, "link", "set", dev, "up")
                              for ns, dev in ((a, va), (b, vb), (a, "lo"), (b, "lo"))))
            if ok:
                self.namespaces = True
                return (Host("node-a", f"{net}.1", ["ip", "netns", "exec", a]),
                        Host("node-b", f"{net}.2", ["ip", "netns", "exec", b]))
            self.why_not = "setting up the veth pair failed"
            self.close()
        return Host("node-a", "127.0.0.2", []), Host("node-b", "127.0.0.3", [])

    def close(self) -> None:
        for ns in self.made:
            _ip("netns", "del", ns)  # takes the veth end inside it along
        self.made.clear()
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)  # only if it never moved
        self.links.clear()


class ProcSampler:
    """Samples RSS and CPU ticks of some processes every `interval` s from a thread."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.series: dict[int, list[tuple[float, int, int]]] = {p: [] for p in pids}  # (t, rss bytes, ticks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            for pid in self.pids:
                self.series[pid].append((now, c.rss_bytes(pid), cpu_ticks(pid)))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def peak_rss(self, pid: int) -> int:
        return max((s[1] for s in self.series[pid]), default=0)

    def busy_window(self, pid: int, after: float, until: float) -> tuple[float, float] | None:
        """First and last sample times between which the process used CPU, within [after, until]."""
        s = [x for x in self.series[pid] if x[0] >= after - self.interval]
        start = end = None
        for prev, cur in zip(s, s[1:]):
            if cur[2] > prev[2] and prev[0] <= until:
                if start is None:
                    start = max(prev[0], after)
                end = min(cur[0], until)
        return (start, end) if start is not None and end is not None and end > start else None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat: busy excludes idle and iowait."""
    with open("/proc/stat", encoding="ascii") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    total = sum(vals[:8])  # guest time is already in user
    return total - vals[3] - vals[4], total


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class Collector:
    role: str  # "collector" (single), "head" or "relay"
    host: Host
    proc: subprocess.Popen[bytes]
    pid: int
    endpoints: list[str]
    log: Path
    counters: dict[str, Any] = field(default_factory=dict)


PROFILE_DIR: Path | None = None  # --profile-collectors: run the collectors under cProfile
_PROFILED_COLLECTOR = """
import cProfile, pstats, runpy, sys, threading, time
from expman.collector import _background
out, sys.argv = sys.argv[1], ["expman.collector", *sys.argv[2:]]
# Each thread's own CPU clock: the receive loop's profile, and one for the background
# threads' jobs (parts, merges), so neither is charged for the other's work.
jobs, drain = [], _background.Background._drain
def profiled_drain(self, owner):
    prof = cProfile.Profile(time.thread_time)
    jobs.append(prof)
    prof.enable()
    try:
        drain(self, owner)
    finally:
        prof.disable()
_background.Background._drain = profiled_drain
prof = cProfile.Profile(time.thread_time)
prof.enable()
try:
    runpy.run_module("expman.collector", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
    if jobs:
        pstats.Stats(*jobs).dump_stats(out[:-len(".prof")] + ".background.prof")
"""
TRACE_DIR: Path | None = None  # --trace-collectors: a collector's memory and backlog every 10 ms, to a CSV
_TRACED_COLLECTOR = """
import runpy, sys, threading, time, weakref
import pyarrow as pa
from expman.collector import _background, _metrics_store, _server
out, sys.argv = sys.argv[1], ["expman.collector", *sys.argv[2:]]
pools, stores, turns = weakref.WeakSet(), weakref.WeakSet(), []
init_pool, init_store = _background.Background.__init__, _metrics_store.MetricsStore.__init__
turn, durable = _server.Collector._turn, _server.Collector._make_durable
def pool(self, *a, **k):
    init_pool(self, *a, **k)
    pools.add(self)
def store(self, *a, **k):
    init_store(self, *a, **k)
    stores.add(self)
def timed_turn(self):
    start = time.monotonic()
    turn(self)
    turns.append((start, time.monotonic() - start, self._last_turn_bytes, self._durable_s))
def timed_durable(self, t):
    start = time.monotonic()
    durable(self, t)
    self._durable_s = time.monotonic() - start
_background.Background.__init__, _metrics_store.MetricsStore.__init__ = pool, store
_server.Collector._turn, _server.Collector._make_durable = timed_turn, timed_durable
begin = time.monotonic()
def sample():
    with open(out, "w") as fh:
        fh.write("t_s,rss_mb,arrow_mb,queued_jobs,pending_rows,pending_frames\\n")
        while True:
            with open("/proc/self/statm") as st:
                rss = int(st.read().split()[1]) * 4096 / 1e6
            jobs = sum(len(q) for b in list(pools) for q in list(b._queues.values()))
            rows = sum(s.pending_rows for s in list(stores))
            frames = sum(s.pending_frames for s in list(stores))
            fh.write(f"{time.monotonic() - begin:.3f},{rss:.1f},{pa.total_allocated_bytes() / 1e6:.1f},{jobs},{rows},{frames}\\n")
            fh.flush()
            with open(out + ".turns", "w") as tf:
                tf.write("start_s,turn_s,bytes,durable_s\\n")
                tf.writelines(f"{s - begin:.3f},{d:.4f},{b},{c:.4f}\\n" for s, d, b, c in list(turns) if b)
            time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
try:
    runpy.run_module("expman.collector", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
"""


def start_collector(role: str, host: Host, args: list[str], work: Path, procs: list[Any], tag: str = "") -> Collector:
    import yaml

    ready, log = work / f"{role}.ready", work / f"{role}.log"
    # Under --profile-collectors: cProfile with a CPU-time clock (waiting for a core is not counted).
    run = ["-c", _PROFILED_COLLECTOR, str(PROFILE_DIR / f"{tag}{role}.prof")] if PROFILE_DIR else \
        ["-c", _TRACED_COLLECTOR, str(TRACE_DIR / f"{tag}{role}.csv")] if TRACE_DIR else ["-m", "expman.collector"]
    proc = subprocess.Popen([*host.prefix, c.PYTHON, *run, "--ready-file", str(ready),
                             "--log-level", "INFO", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    procs.append(proc)
    if not c.wait_until(lambda: ready.exists() or proc.poll() is not None, 30, 0.01) or proc.poll() is not None:
        raise RuntimeError(f"{role} collector did not start: {log.read_text(errors='replace')[-2000:]}")
    info = yaml.safe_load(ready.read_text())
    return Collector(role, host, proc, int(info["pid"]), list(info["endpoints"]), log)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of a rank's stdout, or '' if none comes within `timeout` s (or it exited)."""
    import select

    if select.select([proc.stdout], [], [], timeout)[0]:
        return proc.stdout.readline()
    return ""


def collector_counters(log: Path) -> dict[str, Any]:
    """The counters the collector logs when it stops ('collector stopped: {...}; rejected: {...}')."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "collector stopped: " in line:
            body = line.split("collector stopped: ", 1)[1]
            counters, _, rejected = body.partition("; rejected: ")
            try:
                return {**ast.literal_eval(counters), "rejected": ast.literal_eval(rejected or "{}")}
            except (ValueError, SyntaxError):
                return {}
    return {}


def rank_env(rank: int, world: int, run_id: str, endpoint: str, host: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("EXPMAN_", "SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_"))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        base.pop(k, None)
    return {**base, "EXPMAN_COLLECTOR": endpoint, "EXPMAN_RUN_ID": run_id, "EXPMAN_RANK": str(rank),
            "EXPMAN_WORLD_SIZE": str(world), "EXPMAN_HOST": host}


# --- one measurement ---------------------------------------------------------------------
def run_case(setup: str, mode: str, ranks: int, points: int, cleanup: list[Any]) -> dict[str, Any]:
    import expman

    work = c.make_tmpdir(f"dist-{setup}")
    root = work / "root"
    procs: list[subprocess.Popen[Any]] = []  # collectors, in start order
    rank_procs: list[subprocess.Popen[Any]] = []
    hosts_ctl = TwoHosts()
    sampler: ProcSampler | None = None
    out: dict[str, Any] = {"setup": setup, "mode": mode, "label": f"{SETUPS[setup]}, {MODES[mode]}",
                           "ranks": ranks, "points_per_rank": points}

    def close() -> None:
        if sampler is not None:
            sampler.stop()
        for proc in rank_procs:  # ranks first (killed: on the normal path they have exited already)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for proc in reversed(procs):  # then the relay, then the head
            c.stop_process(proc)
        hosts_ctl.close()
        c.rmtree_quiet(work)

    cleanup.append(close)
    try:
        run_id = f"dist-{setup}-{mode}-{uuid.uuid4().hex[:8]}"
        collectors: list[Collector] = []
        if setup == "single":
            local = Host(os.uname().nodename, "127.0.0.1", [])
            head = start_collector("collector", local, ["--root", str(root), "--bind", f"ipc://{work}/c.sock"],
                                   work, procs, f"{setup}-{mode}-")
            collectors.append(head)
            placement = [(local, head.endpoints[0])] * ranks
            out["hosts_via"] = "one host"
        else:
            a, b = hosts_ctl.open()
            out["hosts_via"] = (f"network namespaces joined by a veth pair ({a.address} <-> {b.address})"
                                if hosts_ctl.namespaces else
                                f"loopback addresses {a.address} / {b.address} (no namespaces: {hosts_ctl.why_not})")
            head = start_collector("head", a, ["--root", str(root), "--bind", f"ipc://{work}/a.sock",
                                               "--bind", f"tcp://{a.address}:0"], work, procs,
                                   f"{setup}-{mode}-")
            head_tcp = next(e for e in head.endpoints if e.startswith("tcp://"))
            relay = start_collector("relay", b, ["--root", str(work / "unused"), "--bind", f"ipc://{work}/b.sock",
                                                 "--forward", head_tcp], work, procs,
                                    f"{setup}-{mode}-")
            collectors += [head, relay]
            half = (ranks + 1) // 2
            placement = [(a, head.endpoints[0]) if r < half else (b, relay.endpoints[0]) for r in range(ranks)]
        out["collectors"] = {col.role: {"host": col.host.name, "endpoints": col.endpoints} for col in collectors}

        # Ranks: start, wait for every "ready" (hello answered), then "go" to all at once.
        for r, (host, endpoint) in enumerate(placement):
            proc = subprocess.Popen(
                [*host.prefix, c.PYTHON, __file__, "--worker", mode, str(points), str(root)],
                env=rank_env(r, ranks, run_id, endpoint, host.name), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=open(work / f"rank{r}.log", "wb"), text=True)
            rank_procs.append(proc)
        for r, proc in enumerate(rank_procs):
            line = read_line(proc, 120)
            if line.strip() != "ready":
                raise RuntimeError(f"rank {r} did not get ready: {line.strip()!r} "
                                   f"{(work / f'rank{r}.log').read_text(errors='replace')[-2000:]}")
        sampler = ProcSampler([col.pid for col in collectors]).start()
        for col in collectors:
            col.counters["hwm_idle_mb"] = c.hwm_bytes(col.pid) / 2**20
            col.counters["rss_idle_mb"] = c.rss_bytes(col.pid) / 2**20
        cpu_go = {col.pid: cpu_ticks(col.pid) for col in collectors}
        time.sleep(0.05)  # a couple of idle samples before "go"
        machine_go = machine_ticks()
        t_go = time.perf_counter()
        for proc in rank_procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for r, proc in enumerate(rank_procs):
            line = read_line(proc, 400)
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                raise RuntimeError(f"rank {r} gave no result: {line!r} "
                                   f"{(work / f'rank{r}.log').read_text(errors='replace')[-2000:]}") from None
            proc.wait(30)
        t_done = time.perf_counter()
        machine_done = machine_ticks()
        sampler.stop()
        for col in collectors:
            col.counters["cpu_s"] = (cpu_ticks(col.pid) - cpu_go[col.pid]) / TICK
            col.counters["hwm_mb"] = c.hwm_bytes(col.pid) / 2**20
            col.counters["peak_sampled_mb"] = sampler.peak_rss(col.pid) / 2**20
            col.counters["samples"] = len(sampler.series[col.pid])
            peak_at = max(sampler.series[col.pid], key=lambda x: x[1], default=(t_go, 0, 0))[0]
            col.counters["peak_at_s"] = peak_at - t_go

        first = min(x["t0"] for x in results)
        last = max(x["t2"] for x in results)
        logged = sum(x["logged"] for x in results)
        out.update(logged=logged, total_s=last - first, last_finish_s=last - t_go, points_per_s=logged / (last - first),
                   go_to_first_log_ms=(first - t_go) * 1e3, parent_saw_done_s=t_done - t_go)
        out["per_rank"] = [{"rank": x["rank"], "loop_pps": x["logged"] / (x["t1"] - x["t0"]),
                            "e2e_pps": x["logged"] / (x["t2"] - x["t0"]), "finish_s": x["t2"] - x["t1"],
                            "cpu_s": x["cpu_s"], "peak_rss_mb": x["peak_rss_mb"], "confirmed": x["confirmed"],
                            "stats_loop": x["stats_loop"], "stats_end": x["stats_end"],
                            "threads_cpu_s": x["threads_cpu_s"]} for x in results]
        per_point = []
        for x in results:
            n = len(x["chunks_ns"])
            for i, ns in enumerate(x["chunks_ns"]):
                pts = CHUNK if i < n - 1 else x["last_chunk_points"]
                if pts == CHUNK:  # whole chunks only
                    per_point.append(ns / pts)
        out["chunk_ns_per_point"] = c.percentiles(per_point) if per_point else {}
        out["ranks_cpu_s"] = sum(x["cpu_s"] for x in results)
        head_col = collectors[0]
        win = sampler.busy_window(head_col.pid, first, last)
        out["collector_busy_s"] = (win[1] - win[0]) if win else None
        out["collectors_cpu_s"] = sum(col.counters["cpu_s"] for col in collectors)
        # Whole machine, go -> every rank's result read: what our processes and everyone else used.
        out["machine_busy_s"] = (machine_done[0] - machine_go[0]) / TICK
        out["machine_total_s"] = (machine_done[1] - machine_go[1]) / TICK
        out["window_s"] = t_done - t_go

        # Read back from the head's run directory.
        run_dirs = {x["run_dir"] for x in results}
        out["run_dirs"] = len(run_dirs)
        run_dir = sorted(run_dirs)[0]
        t3 = time.perf_counter()
        c.wait_until(lambda: expman.open_run(run_dir).status == "finished", 30, 0.05)
        out["status_wait_s"] = time.perf_counter() - t3
        t3 = time.perf_counter()
        run = expman.open_run(run_dir)
        out["status"] = run.status
        expected_host = {r: placement[r][0].name for r in range(ranks)}
        table = run.metrics()
        out["read_s"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        out["check"] = check_points(table, ranks, mode, points, expected_host if setup == "relay" else None)
        out["check_s"] = time.perf_counter() - t4
        out["run_hosts"] = sorted(run.info.get("hosts") or [])
        out["run_ranks_finished"] = sum(1 for v in (run.info.get("ranks") or {}).values() if v.get("status") == "finished")

        # The run's parts merged into one (its WAL folder goes only then): the collector's
        # peak with that final merge, which runs after the last finish() is answered.
        out["merged_at_end"] = c.wait_until(lambda: not (Path(run_dir) / ".wal").exists(), 120, 0.05)
        for col in collectors:
            col.counters["hwm_end_mb"] = c.hwm_bytes(col.pid) / 2**20
        for col in reversed(collectors):  # relay first, so it does not resend into a stopped head
            code = c.stop_process(col.proc)
            col.counters.update(collector_counters(col.log), exit_code=code)
        out["collector_figures"] = {col.role: col.counters for col in collectors}
        rows_counted = head_col.counters.get("points")
        out["collector_rows"] = rows_counted
        if rows_counted and out["collector_busy_s"]:
            out["collector_side_pps"] = rows_counted / out["collector_busy_s"]
        if rows_counted and head_col.counters["cpu_s"]:
            out["rows_per_collector_cpu_s"] = rows_counted / head_col.counters["cpu_s"]
        out["data_ok"] = bool(out["check"]["ok"] and out["run_dirs"] == 1 and all(x["confirmed"] for x in results)
                              and all(x["stats_end"]["dropped"] == 0 for x in results))
    finally:
        cleanup.remove(close)
        close()
    return out


def check_points(tbl: Any, ranks: int, mode: str, points: int, hosts: dict[int, str] | None) -> dict[str, Any]:
    """Every (rank, key): steps exactly 0..n-1, each once; values as logged; hosts as placed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = ["loss"] if mode == "metric" else [f"layer{k}/grad_norm" for k in range(KEYS)]
    n = points if mode == "metric" else points // KEYS
    tbl = tbl.set_column(tbl.schema.get_field_index("key"), "key", tbl["key"].cast(pa.string()))
    agg = tbl.group_by(["rank", "key"]).aggregate(
        [("step", "count"), ("step", "count_distinct"), ("step", "min"), ("step", "max")]).to_pylist()
    got = {(g["rank"], g["key"]): g for g in agg}
    per_rank = []
    for r in range(ranks):
        lost = dup = 0
        exact = True
        for k in keys:
            g = got.get((r, k))
            if g is None:
                lost += n
                exact = False
                continue
            distinct_in_range = g["step_count_distinct"] if g["step_min"] >= 0 and g["step_max"] < n else None
            if distinct_in_range is None:
                exact = False
                distinct_in_range = g["step_count_distinct"]  # an out-of-range step is itself wrong
            lost += n - min(n, distinct_in_range)
            dup += g["step_count"] - g["step_count_distinct"]
            exact = exact and g["step_count"] == n == g["step_count_distinct"] and g["step_min"] == 0 and g["step_max"] == n - 1
        per_rank.append({"rank": r, "lost": lost, "duplicates": dup, "exact": exact})
    extra = sum(1 for key in got if key[0] not in range(ranks) or key[1] not in keys)
    expected = pc.add(pc.cast(tbl["step"], pa.float64()), pc.multiply(pc.cast(tbl["rank"], pa.float64()), VALUE_OFFSET))
    wrong_values = tbl.num_rows - pc.sum(pc.equal(tbl["value"], expected).cast(pa.int64())).as_py()
    host_ok = True
    if hosts is not None:
        hcol = tbl["host"].cast(pa.string())
        pairs = pa.table({"rank": tbl["rank"], "host": hcol}).group_by(["rank", "host"]).aggregate([]).to_pylist()
        host_ok = sorted((p["rank"], p["host"]) for p in pairs) == sorted(hosts.items())
    ok = all(p["exact"] for p in per_rank) and extra == 0 and wrong_values == 0 and host_ok
    return {"ok": ok, "rows": tbl.num_rows, "expected_rows": ranks * n * len(keys), "per_rank": per_rank,
            "lost": sum(p["lost"] for p in per_rank), "duplicates": sum(p["duplicates"] for p in per_rank),
            "unexpected_series": extra, "wrong_values": wrong_values, "hosts_ok": host_ok}


# --- output ----------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    n = len(v)
    return {"p50": v[min(n - 1, int(0.5 * n))], "p99": v[min(n - 1, int(0.99 * n))], "min": v[0], "max": v[-1]}


def collector_label(role: str) -> str:
    return role if role == "collector" else f"{role} collector"


def print_case(r: dict[str, Any]) -> None:
    m = 1e6
    ncpu = os.cpu_count() or 1
    ok = r["points_per_s"] >= c.TARGET_E2E_POINTS_PER_S
    print(f"\n== distributed: {r['label']}: {r['ranks']} ranks x {r['points_per_rank']:,} points "
          f"({r['logged']:,} in all)")
    print(f"   hosts: {r['hosts_via']}")
    for role, info in r["collectors"].items():
        print(f"   {collector_label(role)} on {info['host']}: {', '.join(info['endpoints'])}")
    print(f"   aggregate, first rank's first log call -> last rank's finish() returned: {r['total_s']:.2f} s = "
          f"{r['points_per_s'] / m:.2f} M points/s (target >= {c.TARGET_E2E_POINTS_PER_S / m:.0f} M/s: {c.verdict(ok)})")
    if r.get("collector_side_pps"):
        print(f"   collector side: {r['collector_rows']:,} rows counted / busy {r['collector_busy_s']:.2f} s = "
              f"{r['collector_side_pps'] / m:.2f} M rows/s; {r['rows_per_collector_cpu_s'] / m:.2f} M rows per "
              f"collector CPU-second")
    loop = spread([x["loop_pps"] for x in r["per_rank"]])
    e2e = spread([x["e2e_pps"] for x in r["per_rank"]])
    fin = spread([x["finish_s"] for x in r["per_rank"]])
    print(f"   per rank, logging loop: p50 {loop['p50'] / m:.3f} M/s, p99 {loop['p99'] / m:.3f} M/s, "
          f"min {loop['min'] / m:.3f} M/s; first call -> finish(): p50 {e2e['p50'] / m:.3f}, min {e2e['min'] / m:.3f} M/s; "
          f"finish() p50 {fin['p50'] * 1e3:.0f} ms, max {fin['max'] * 1e3:.0f} ms")
    ch = r["chunk_ns_per_point"]
    if ch:
        print(f"   per {CHUNK}-point chunk: p50 {ch['p50']:.0f} ns/point ({1e3 / ch['p50']:.2f} M/s), "
              f"p99 {ch['p99']:.0f} ns/point, worst {ch['max']:.0f} ns/point "
              f"({ch['max'] * CHUNK / 1e6:.1f} ms for one chunk: waiting for a core)")
    backlog = max(x["stats_loop"]["buffered"] for x in r["per_rank"])
    print(f"   at the end of the loops: largest backlog in a rank {backlog:,} points; dropped "
          f"{sum(x['stats_end']['dropped'] for x in r['per_rank'])}; every finish() confirmed: "
          f"{all(x['confirmed'] for x in r['per_rank'])}")
    for role, f in r["collector_figures"].items():
        extra = ""
        if f.get("frames") is not None:
            extra = (f"; frames {f.get('frames', 0):,}, points {f.get('points', 0):,}, duplicates {f.get('duplicates', 0)}, "
                     f"relay-busy {f.get('relay-busy', 0)}, rejected {sum((f.get('rejected') or {}).values())}")
        print(f"   {collector_label(role)}: VmHWM {f['hwm_mb']:.0f} MB (idle {f['hwm_idle_mb']:.0f} MB; "
              f"{f.get('hwm_end_mb', 0):.0f} MB once the run was merged into one part"
              f"{'' if r.get('merged_at_end') else ', not done in 120 s'}), peak sampled "
              f"{f['peak_sampled_mb']:.0f} MB ({f['samples']} samples, peak at +{f['peak_at_s']:.1f} s; last finish at "
              f"+{r['last_finish_s']:.1f} s), CPU {f['cpu_s']:.2f} s{extra}; exit {f.get('exit_code')}")
    busy = r["ranks_cpu_s"] + r["collectors_cpu_s"]
    th = {k: sum(x["threads_cpu_s"].get(k, 0.0) for x in r["per_rank"]) for k in ("main", "other", "zmq")}
    print(f"   CPU from go to done: ranks {r['ranks_cpu_s']:.2f} s ({r['ranks_cpu_s'] * 1e9 / r['logged']:.0f} ns/point), "
          f"collectors {r['collectors_cpu_s']:.2f} s ({r['collectors_cpu_s'] * 1e9 / r['logged']:.0f} ns/point); "
          f"{busy:.2f} CPU-s of {ncpu * r['total_s']:.2f} available ({100 * busy / (ncpu * r['total_s']):.0f}% of {ncpu} cores)")
    print(f"   ranks' CPU by thread: logging (main) {th['main']:.2f} s ({th['main'] * 1e9 / r['logged']:.0f} ns/point), "
          f"expman sender {th['other']:.2f} s ({th['other'] * 1e9 / r['logged']:.0f} ns/point), "
          f"ZeroMQ I/O {th['zmq']:.2f} s ({th['zmq'] * 1e9 / r['logged']:.0f} ns/point)")
    others = r["machine_busy_s"] - busy
    print(f"   whole machine over the same {r['window_s']:.2f} s: {r['machine_busy_s']:.2f} CPU-s busy of "
          f"{r['machine_total_s']:.2f}; other processes (not this benchmark's ranks/collectors) "
          f"~{max(0.0, others):.2f} CPU-s, idle {r['machine_total_s'] - r['machine_busy_s']:.2f} CPU-s")
    ceiling = ncpu * r["logged"] / busy if busy else 0
    print(f"   CPU-bound ceiling on this machine: {ncpu} cores / "
          f"{busy * 1e9 / r['logged']:.0f} ns of CPU per point = {ceiling / m:.2f} M points/s")
    ck = r["check"]
    print(f"   run.yaml said finished {r['status_wait_s']:.2f} s after the last finish(); "
          f"read back: {ck['rows']:,} rows (expected {ck['expected_rows']:,}) in {r['read_s']:.2f} s (checked in {r['check_s']:.2f} s), "
          f"{r['run_dirs']} run dir(s), status {r['status']}, hosts {r['run_hosts']}, "
          f"{r['run_ranks_finished']}/{r['ranks']} ranks finished")
    print(f"   per-rank sequence check: lost {ck['lost']}, duplicated {ck['duplicates']}, wrong values "
          f"{ck['wrong_values']}, unexpected series {ck['unexpected_series']}, hosts "
          f"{'OK' if ck['hosts_ok'] else 'WRONG'}: {'OK' if r['data_ok'] else 'PROBLEM'}")
    bad = [p for p in ck["per_rank"] if not p["exact"]]
    for p in bad:
        print(f"     rank {p['rank']}: lost {p['lost']}, duplicated {p['duplicates']}")


def print_profiles(setup: str, mode: str) -> None:
    import pstats

    for prof in sorted(PROFILE_DIR.glob(f"{setup}-{mode}-*.prof")):
        what = "background jobs (parts, merges)" if prof.name.endswith(".background.prof") else "receive loop thread"
        print(f"   -- {prof.name}: {what}, top functions by own CPU time (the collector's whole life, start-up and final "
              f"merge included)")
        stats = pstats.Stats(str(prof))
        stats.sort_stats("tottime")
        _, items = stats.get_print_list([14])
        total = stats.total_tt
        for func in items:
            cc, nc, tt, ct, _ = stats.stats[func]
            print(f"      {tt:6.2f} s own {100 * tt / total:4.1f}%  {ct:6.2f} s cum  {nc:>7} calls  "
                  f"{pstats.func_std_string(func)[-90:]}")


def summary_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        loop = spread([x["loop_pps"] for x in r["per_rank"]])
        rows.append([
            r["setup"], r["mode"], f"{r['ranks']}x{r['points_per_rank'] // 1000}k",
            f"{r['points_per_s'] / 1e6:.2f} M/s", c.verdict(r["points_per_s"] >= c.TARGET_E2E_POINTS_PER_S),
            f"{r['collector_side_pps'] / 1e6:.2f} M/s" if r.get("collector_side_pps") else "-",
            f"{loop['p50'] / 1e6:.2f} / {loop['min'] / 1e6:.2f}",
            f"{r['check']['lost']} / {r['check']['duplicates']}",
            " + ".join(f"{f['hwm_mb']:.0f}" for f in r["collector_figures"].values()) + " MB",
            f"{r['ranks_cpu_s']:.1f} / {r['collectors_cpu_s']:.1f}",
            "OK" if r["data_ok"] else "PROBLEM",
        ])
    return rows


SUMMARY_HEADER = ["setup", "loop", "ranks x pts", "aggregate", ">= 2 M/s", "collector side",
                  "per-rank loop p50 / min", "lost / dup", "collector VmHWM", "CPU s ranks / coll", "data"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", choices=["all", *SETUPS], default="all")
    p.add_argument("--mode", choices=["all", *MODES], default="all")
    p.add_argument("--ranks", type=int, default=8, help="rank processes (default 8; relay: half on each host)")
    p.add_argument("--points", type=int, default=500_000, help="points per rank (default 500000)")
    p.add_argument("--profile-collectors", metavar="DIR",
                   help="run the collectors under cProfile, write DIR/<setup>-<loop>-<role>.prof, print the top functions")
    p.add_argument("--trace-collectors", metavar="DIR",
                   help="sample each collector's RSS, Arrow memory and backlog every 10 ms into DIR/<setup>-<loop>-<role>.csv")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.trace_collectors:
        global TRACE_DIR
        TRACE_DIR = Path(args.trace_collectors).resolve()
        TRACE_DIR.mkdir(parents=True, exist_ok=True)
    if args.profile_collectors:
        global PROFILE_DIR
        PROFILE_DIR = Path(args.profile_collectors).resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    if args.ranks < 1 or (args.setup != "single" and args.ranks < 2):
        p.error("--ranks must be >= 1 (>= 2 with the relay set-up)")

    cleanup: list[Any] = []

    def clean_all() -> None:
        for fn in list(cleanup):
            try:
                fn()
            except Exception as exc:  # keep cleaning
                print(f"   (cleanup raised {exc!r})", file=sys.stderr)
        cleanup.clear()

    atexit.register(clean_all)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    started = time.perf_counter()
    print(f"machine: {c.machine_line()}", flush=True)
    results = []
    try:
        for setup in SETUPS if args.setup == "all" else [args.setup]:
            for mode in MODES if args.mode == "all" else [args.mode]:
                r = run_case(setup, mode, args.ranks, args.points, cleanup)
                print_case(r)
                if PROFILE_DIR:
                    print_profiles(setup, mode)
                sys.stdout.flush()
                results.append(r)
    finally:
        clean_all()
    print(f"\n{'=' * 25} distributed SUMMARY {'=' * 25}")
    print(c.table(summary_rows(results), SUMMARY_HEADER))
    print(f"total {time.perf_counter() - started:.0f} s")
    c.write_json(args.json, {f"{r['setup']}/{r['mode']}": r for r in results})
    return 0 if all(r["data_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
