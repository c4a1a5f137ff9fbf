"""A rank killed with -9: steps its log_metric had returned that are missing, and the time
until the run says `crashed` (issue 13 item 5, issue 18 item 2).

One rank process logs `loss` once per step, at 1,000 steps/s or flat out, and after each
call stores its step count in a shared counter file (mmap): after the kill that counter
is exactly the steps whose `log_metric` had returned. Every 10 steps (100 flat out) it also
stores the most points its sender had handed to ZeroMQ (`exp.stats()["sent"]`). After
`--seconds` of logging the benchmark sends SIGKILL, reaps the rank, and once the run is
crashed (and a private collector has exited) reads it back: missing = returned steps not
stored; "handed to ZeroMQ" = those of them below the last sent count, the rest were still
in the sender's buffers. Neither kind reached the collector's socket: a handed-over frame
can wait in the rank's ZeroMQ queue while the socket buffer is full (flat out on busy
cores), and both die with the process, unless the collector stores them from the rank's
point ring in shared memory (expman/_storage/ring.py; "from the ring" counts them, read
from the collector's log). `--no-ring` turns the ring off in the ranks: the figures
before it. Each try prints the missing step range: always a tail, so what is stored is a
contiguous prefix.

Modes: **local** (no collector configured: a private collector per rank, which drains its
socket when the rank dies, then marks it crashed), **service** (the benchmark's own
`python -m expman.collector`, shared by the tries; it learns of the death by missed
heartbeats, two intervals of 5 s plus 1 s). Time to crashed is the rank's `ended_at` in
run.yaml (set when the collector marked it lost) minus the time of the kill.

    python benchmarks/bench_kill.py                   # 5 tries each: local and service, 1,000/s and flat out (~1 min)
    python benchmarks/bench_kill.py --modes local --tries 13
    python benchmarks/bench_kill.py --no-ring         # the same without the point ring
"""

from __future__ import annotations

import argparse
import datetime as dt
import mmap
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

RANK = r"""
import mmap, struct, sys, time
counter_path, root, collector, rate, name = sys.argv[1], sys.argv[2], sys.argv[3] or None, float(sys.argv[4]), sys.argv[5]
with open(counter_path, "r+b") as fh:
    mm = mmap.mmap(fh.fileno(), 32)
import expman
exp = expman.start_experiment("bench", name, root=root, collector=collector)
print(exp.run_dir, flush=True)
from expman._rank import start as _api
for local in _api._local_collectors.values():
    struct.pack_into("q", mm, 24, local._proc.pid)  # local mode: the private collector, waited for after the try
log, pack, stats = exp.log_metric, struct.pack_into, exp.stats
log("loss", 0.0, step=0)
pack("q", mm, 0, 1)
while stats()["acked"] < 1:
    time.sleep(0.005)
pack("q", mm, 16, 1)  # ready: the collector has stored the first point
step, sent, every = 1, 0, 10 if rate else 100
interval = 1.0 / rate if rate else 0.0
clock, sleep = time.perf_counter, time.sleep
due = clock()
while True:
    log("loss", float(step), step=step)
    step += 1
    pack("q", mm, 0, step)  # returned: steps 0..step-1
    if step % every == 0:
        s = stats()["sent"]  # a resend takes a frame off "sent" until it goes again: keep the most
        if s > sent:
            sent = s
            pack("q", mm, 8, sent)
    if interval:
        due += interval
        wait = due - clock()
        if wait > 0:
            sleep(wait)
"""


def _start_service(work: Path) -> tuple[subprocess.Popen, str]:
    ready = work / "ready.yaml"
    with open(work / "service.log", "ab") as err:  # its WARNINGs say what it stored from a dead rank's ring
        proc = subprocess.Popen([c.PYTHON, "-m", "expman.collector", "--root", str(work / "runs"),
                                 "--bind", f"ipc://{work}/c.sock", "--ready-file", str(ready), "--log-level", "WARNING"],
                                stderr=err)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench_kill: the service collector did not start")
        time.sleep(0.02)
    return proc, yaml.safe_load(ready.read_text())["endpoints"][0]


def _try(work: Path, name: str, endpoint: str, rate: float, seconds: float) -> dict:
    """Start a rank, let it log `seconds`, kill -9 it; the facts needed to score it later."""
    counter = work / f"{name}.counter"
    counter.write_bytes(b"\0" * 32)
    with open(counter, "r+b") as fh:
        mm = mmap.mmap(fh.fileno(), 32)
    env = {k: v for k, v in os.environ.items() if k != "EXPMAN_COLLECTOR"}
    with open(work / "ranks.log", "ab") as err:  # the rank's and its private collector's messages
        proc = subprocess.Popen([c.PYTHON, "-c", RANK, str(counter), str(work / "runs"), endpoint, str(rate), name],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    run_dir = Path(proc.stdout.readline().strip())
    deadline = time.monotonic() + 60
    while struct.unpack_from("q", mm, 16)[0] != 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench_kill: the rank of {name} did not get its first point stored")
        time.sleep(0.01)
    time.sleep(seconds)
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    returned, sent, _, collector = struct.unpack_from("qqqq", mm, 0)
    mm.close()
    return {"run_dir": run_dir, "killed_at": killed_at, "returned": returned, "sent": sent, "collector": collector}


def _wait_exit(pid: int, timeout: float = 60.0) -> None:
    """A private collector (not our child) has exited: its last writes are done."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in (b"Z", b"X"):
            return
        time.sleep(0.02)


def _crashed(run_dir: Path) -> dict | None:
    try:
        info = yaml.safe_load((run_dir / "run.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return info if info.get("status") == "crashed" else None


def _score(t: dict, deadline_s: float) -> dict:
    """Wait for the run to be crashed, then count what is missing."""
    import expman

    deadline = time.monotonic() + deadline_s
    while (info := _crashed(t["run_dir"])) is None:
        if time.monotonic() > deadline:
            return {**t, "crash_s": None, "missing": None}
        time.sleep(0.01)
    ended = dt.datetime.fromisoformat(info["ranks"][0]["ended_at"]).timestamp()
    _wait_exit(t.get("collector", 0))  # local mode: read what the private collector left, once it is done
    steps = expman.open_run(t["run_dir"]).metrics(keys=["loss"], columns=["step"]).column("step").to_pylist()
    stored = set(steps)
    returned, sent = t["returned"], min(t["sent"], t["returned"])
    missing = [s for s in range(returned) if s not in stored]
    if missing:
        print(f"  {t['run_dir'].name}: returned {returned:,}, handed to ZeroMQ {sent:,}, stored {len(stored):,}, "
              f"missing steps {missing[0]:,}..{missing[-1]:,}", flush=True)
    return {**t, "crash_s": ended - t["killed_at"], "missing": len(missing), "from_ring": _from_ring(t["run_dir"]),
            "missing_sent": sum(1 for s in missing if s < sent), "missing_unsent": sum(1 for s in missing if s >= sent),
            "stored": len(stored), "duplicates": len(steps) - len(stored)}


def _from_ring(run_dir: Path) -> int:
    """Points the collector stored from the dead rank's ring, as its log says."""
    uid = run_dir.name.rsplit("-", 1)[-1]
    said = re.compile(rf"run {uid} rank \d+: stored (\d+) points from the dead process's ring")
    work = run_dir.parent.parent.parent
    text = "".join(p.read_text(errors="replace") for p in (work / "ranks.log", work / "service.log") if p.exists())
    return sum(int(m.group(1)) for m in said.finditer(text))


def _report(mode: str, rate: float, seconds: float, scored: list[dict]) -> None:
    label = f"{mode:7s} {'flat out' if not rate else f'{rate:,.0f}/s':>9s}"
    done = [s for s in scored if s["missing"] is not None]
    if len(done) < len(scored):
        print(f"{label}: {len(scored) - len(done)} of {len(scored)} runs never became crashed")
    if not done:
        return

    def med_max(key: str, fmt: str = "{:,.0f}") -> str:
        vals = [s[key] for s in done]
        return f"{fmt.format(statistics.median(vals))} / {fmt.format(max(vals))}"

    rates = [s["returned"] / seconds for s in done]
    print(f"{label}: missing {med_max('missing')} (of them handed to ZeroMQ {med_max('missing_sent')}, still in the "
          f"sender's buffers {med_max('missing_unsent')}); from the ring {med_max('from_ring')}  "
          f"time to crashed {med_max('crash_s', '{:.2f}')} s  "
          f"[median / max of {len(done)}; ~{statistics.median(rates):,.0f} steps/s; "
          f"per try missing {[s['missing'] for s in done]}; duplicates {sum(s['duplicates'] for s in done)}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=("local", "service"), default=["local", "service"])
    p.add_argument("--rates", nargs="+", type=float, default=[1000.0, 0.0], help="steps/s; 0 is flat out")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="logging before the kill, per try")
    p.add_argument("--no-ring", action="store_true", help="ranks without the point ring (the figures before it)")
    args = p.parse_args(argv)
    if args.no_ring:
        os.environ["EXPMAN_RING_POINTS"] = "0"
    work = c.make_tmpdir("kill")
    os.environ["EXPMAN_SPOOL_DIR"] = str(work / "spool")
    os.environ["EXPMAN_RING_DIR"] = str(work / "rings")
    service = None
    print(f"bench_kill: {args.tries} tries per case, {args.seconds:g} s of logging each, point ring "
          f"{'off' if args.no_ring else 'on'}; load {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for mode in args.modes:
            endpoint = ""
            if mode == "service":
                service, endpoint = _start_service(work)
            for rate in args.rates:
                tries = []
                for i in range(args.tries):
                    t = _try(work, f"{mode}-{int(rate)}-{i}", endpoint, rate, args.seconds)
                    # local: each try waits for its crash (its collector then exits);
                    # service: missed heartbeats take ~11 s, so tries go on and are scored together
                    tries.append(_score(t, 60) if mode == "local" else t)
                if mode == "service":
                    tries = [_score(t, 60) for t in tries]
                _report(mode, rate, args.seconds, tries)
            if service is not None:
                service.terminate()
                service.wait(60)
                service = None
    finally:
        if service is not None:
            service.kill()
            service.wait()
        c.rmtree_quiet(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
