"""Many concurrent runs into one collector (issue 20, item 1).

One `python -m expman.collector` on an ipc:// socket; N runs, each in its own rank
process (or --per-process K runs sharing one process, for N past what the machine's
memory holds as processes), each logging --points points (default 2,000) at --rate
steps/s (default 100), then `finish()` with its default timeout. Every run first says
hello and waits for "go", so start-up is not counted; the collector's RSS with N idle
runs open gives the cost of an idle run.

Reported per N: finish() True count, runs `finished` in run.yaml, points stored (each
run's steps exactly 0..points-1, once), collector CPU per point (from "go" to the last
finish), collector peak RSS (VmHWM), RSS per idle run, wall time, and the rank processes'
CPU per point while logging (their sender threads included) and while in finish(), and the
machine's 1-minute load average at "go" and at the end (other jobs share the machine).

    python benchmarks/bench_concurrent.py                     # N = 10 and 100
    python benchmarks/bench_concurrent.py --runs 1000 --per-process 50
    python benchmarks/bench_concurrent.py --ack-wait --runs    # only: a rank waiting for acks

Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(argv: list[str]) -> int:
    """`--worker K POINTS RATE ROOT TAG`: K runs in this process, logged side by side."""
    k, points, rate, root, tag = int(argv[0]), int(argv[1]), float(argv[2]), argv[3], argv[4]
    import expman

    exps = [expman.start_experiment("concurrent", f"{tag}-{i}", root=root) for i in range(k)]
    deadline = time.monotonic() + 300
    while not all(e._channel.hello_sent and e.stats()["unacked_frames"] == 0 for e in exps):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "the collector never answered the hellos"}), flush=True)
            return 2
        time.sleep(0.01)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 3
    t0, c0 = time.monotonic(), sum(os.times()[:2])
    for step in range(points):
        for e in exps:
            e.log_metric("loss", float(step), step=step)
        wait = t0 + (step + 1) / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    c1 = sum(os.times()[:2])
    results: list[dict] = [{} for _ in exps]

    def finish(i: int) -> None:  # all at once, as K processes would, each with its default timeout
        f0 = time.monotonic()
        ok = exps[i].finish()
        results[i] = {"ok": ok, "dir": str(exps[i].run_dir), "finish_s": time.monotonic() - f0}

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(len(exps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"runs": results, "log_cpu_s": c1 - c0, "finish_cpu_s": sum(os.times()[:2]) - c1}), flush=True)
    return 0


def ack_waiter(argv: list[str]) -> int:
    """`--ack-waiter ROOT SECONDS`: say ready once the hello is acked; at "go" (the
    collector is stopped by then) log a point and wait in finish(); print its CPU use."""
    root, seconds = argv[0], float(argv[1])
    import expman

    exp = expman.start_experiment("concurrent", "ack-wait", root=root)
    while not (exp._channel.hello_sent and exp.stats()["unacked_frames"] == 0):
        time.sleep(0.01)
    print("ready", flush=True)
    sys.stdin.readline()
    exp.log_metric("loss", 1.0, step=0)
    time.sleep(0.5)  # the frame goes out; from here the rank only waits for its ack
    waiter = threading.Thread(target=exp.finish, kwargs={"timeout": seconds})
    waiter.start()
    time.sleep(1.0)  # measured inside the wait: not the finish frame going out, not the spill at the timeout
    t0, c0 = time.monotonic(), sum(os.times()[:2])
    time.sleep(seconds - 2.0)
    out = {"waited_s": time.monotonic() - t0, "cpu_s": sum(os.times()[:2]) - c0}
    waiter.join()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.exit(worker(sys.argv[2:]))
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--ack-waiter":
    sys.exit(ack_waiter(sys.argv[2:]))


from _common import PYTHON, ExternalCollector, make_tmpdir, rmtree_quiet  # noqa: E402


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> float:
    """CPU seconds the whole machine used (all cores): ranks and collector compete for them."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def proc_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def check_run(run_dir: str, points: int) -> tuple[bool, bool]:
    """(every step 0..points-1 stored exactly once, run.yaml says finished)."""
    import expman
    import yaml

    status = yaml.safe_load((Path(run_dir) / "run.yaml").read_text()).get("status")
    steps = expman.open_run(run_dir).metrics().column("step").to_pylist()
    return sorted(steps) == list(range(points)), status == "finished"


class Collector(ExternalCollector):
    """The benchmark's collector; with `profile`, run under cProfile (stats written at exit)."""

    def __init__(self, workdir: Path, profile: str | None) -> None:
        super().__init__(workdir)
        self.profile = profile

    def start(self, timeout: float = 60.0) -> Collector:
        prefix = [PYTHON, "-m", "cProfile", "-o", self.profile] if self.profile else [PYTHON]
        cmd = [*prefix, "-m", "expman.collector", "--root", str(self.root), "--bind", self.endpoint,
               "--ready-file", str(self.ready), "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the collector did not start")
            time.sleep(0.01)
        return self


def run_case(n: int, per: int, points: int, rate: float, profile: str | None = None) -> dict:
    work = make_tmpdir(f"concurrent-{n}")
    coll = Collector(work, profile).start()
    pid = coll.proc.pid
    rss0 = proc_kb(pid, "VmRSS")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EXPMAN_")}, "EXPMAN_COLLECTOR": coll.endpoint,
           "EXPMAN_SPOOL_DIR": str(work / "spool")}
    procs = []
    try:
        for i in range(0, n, per):
            procs.append(subprocess.Popen(
                [PYTHON, __file__, "--worker", str(min(per, n - i)), str(points), str(rate), str(coll.root), f"r{i}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        for p in procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a rank process said {line!r}")
        time.sleep(2.0)  # let the collector settle with every run open and idle
        rss_idle = proc_kb(pid, "VmRSS")
        cpu0, t0, machine0, load0 = proc_cpu_s(pid), time.monotonic(), machine_cpu_s(), os.getloadavg()[0]
        ranks_cpu0 = sum(os.times()[2:4])  # children that ended: the rank processes
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        runs, log_cpu, finish_cpu = [], 0.0, 0.0
        for p in procs:
            out = json.loads(p.stdout.readline())
            runs.extend(out["runs"])
            log_cpu += out["log_cpu_s"]
            finish_cpu += out["finish_cpu_s"]
            p.wait(60)
        wall, load1 = time.monotonic() - t0, os.getloadavg()[0]
        ranks_cpu = sum(os.times()[2:4]) - ranks_cpu0
        cpu = proc_cpu_s(pid) - cpu0
        machine = machine_cpu_s() - machine0
        hwm = proc_kb(pid, "VmHWM")
        checks = [check_run(r["dir"], points) for r in runs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        coll.close()
    total = n * points
    return {
        "runs": n, "per_process": per, "points": total, "wall_s": round(wall, 1),
        "finish_true": sum(r["ok"] for r in runs), "finish_max_s": round(max(r["finish_s"] for r in runs), 2),
        "stored_once": sum(c[0] for c in checks), "finished": sum(c[1] for c in checks),
        "collector_cpu_s": round(cpu, 2), "machine_cpu_s": round(machine, 1),
        "ranks_cpu_s": round(ranks_cpu, 1), "cpu_us_per_point": round(cpu / total * 1e6, 1),
        "rank_cpu_us_per_point": round(log_cpu / total * 1e6, 1), "ranks_finish_cpu_s": round(finish_cpu, 1),
        "collector_peak_rss_mb": round(hwm / 1024, 1), "idle_run_kb": round((rss_idle - rss0) / n, 1),
        "load": [round(load0, 1), round(load1, 1)],  # 1-minute load average at "go" and at the last finish
        "_work": str(work),
    }


def ack_wait_case(seconds: float = 22.0, collector: str = "stopped") -> dict:
    """CPU of a rank waiting in finish() for acks from a stopped (SIGSTOP) or a dead
    (SIGKILL: ZeroMQ retries the connection) collector."""
    work = make_tmpdir("ack-wait")
    coll = Collector(work, None).start()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EXPMAN_")}, "EXPMAN_COLLECTOR": coll.endpoint,
           "EXPMAN_SPOOL_DIR": str(work / "spool")}
    proc = subprocess.Popen([PYTHON, __file__, "--ack-waiter", str(coll.root), str(seconds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        if collector == "stopped":
            coll.sigstop()
        else:
            coll.proc.kill()
            coll.proc.wait()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = json.loads(proc.stdout.readline())
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        coll.close()
        rmtree_quiet(work)
    return {"collector": collector, "ack_wait_s": round(out["waited_s"], 1),
            "ack_wait_core_pct": round(100 * out["cpu_s"] / out["waited_s"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="*", default=[10, 100])
    p.add_argument("--per-process", type=int, default=1, help="runs per rank process (default 1)")
    p.add_argument("--points", type=int, default=2000)
    p.add_argument("--rate", type=float, default=100.0, help="steps per second per run")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--profile", metavar="FILE", help="run the collector under cProfile, stats to FILE (last N)")
    p.add_argument("--ack-wait", action="store_true", help="also: CPU of a rank waiting for acks in finish()")
    args = p.parse_args(argv)
    results, ok = [], True
    if args.ack_wait:
        for collector in ("stopped", "dead"):
            print(json.dumps(ack_wait_case(collector=collector)), flush=True)
    for n in args.runs:
        r = run_case(n, args.per_process, args.points, args.rate, args.profile)
        rmtree_quiet(r.pop("_work"))
        good = r["finish_true"] == r["stored_once"] == r["finished"] == n
        ok &= good
        print(json.dumps({**r, "ok": good}), flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
