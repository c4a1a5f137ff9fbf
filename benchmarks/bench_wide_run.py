"""One wide run finishing must not stall the others (issue 13, item 6).

One `python -m expman.collector` on an ipc:// socket. A rank process logs --keys distinct
keys (default 1,000,000; one point each, through `log_metrics` in dicts of 1,000), then
calls finish(). Meanwhile this process is a second run's rank speaking the wire protocol
itself on a DEALER socket: one small metrics frame every 5 ms, each timed from its send
to its acknowledgement. That is the latency every other run on the collector sees.

Reported: the probe's ack latency p50 / p99 / max before the wide run starts (baseline)
and while it logs, finishes and is merged (until its folder holds one part and no WAL);
the wide run's logging time, its finish() time and result, the time until its parts are
merged into one, and the collector's peak RSS. Every probe frame must be acknowledged
and the wide run's points all read back. Target: max ack latency <= 1 s.

    python benchmarks/bench_wide_run.py                 # 1,000,000 keys
    python benchmarks/bench_wide_run.py --keys 100000

Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROBE_EVERY_S = 0.005
TARGET_MAX_S = 1.0


def wide_rank(argv: list[str]) -> int:
    """`--wide-rank KEYS ROOT ENDPOINT`: log KEYS keys once each, then finish()."""
    keys, root, endpoint = int(argv[0]), argv[1], argv[2]
    import expman

    exp = expman.start_experiment("wide", "wide", root=root, collector=endpoint, finish_timeout=600)
    print("ready", exp.run_dir, flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    batch = 1000
    for first in range(0, keys, batch):
        exp.log_metrics({f"key/{i:07d}": float(i) for i in range(first, min(first + batch, keys))}, step=0)
    logged = time.monotonic()
    ok = exp.finish()
    finished = time.monotonic()
    print(f"done {logged - started:.3f} {finished - logged:.3f} {ok}", flush=True)
    return 0


class Probe:
    """A rank of another run, on the wire: hello, then metrics frames, each timed to its ack."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        from expman._wire import columns
        from expman._wire import frames as proto

        self.zmq, self.proto, self.columns = zmq, proto, columns
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self.run, self.sender, self.seq = os.urandom(6).hex(), os.urandom(16).hex(), 0
        self.sent: dict[int, float] = {}
        self.latencies: list[tuple[float, float]] = []  # (sent at, seconds to its ack)
        self._send(proto.HELLO, {"experiment": "probe", "name": "probe", "world_size": 1, "pid": os.getpid(),
                                 "started_at": time.time()})
        deadline = time.monotonic() + 30
        while self.sent and time.monotonic() < deadline:
            self.poll(0.05)
        if self.sent:
            raise RuntimeError("the collector did not answer the probe's hello")
        self.latencies.clear()

    def _send(self, kind: str, body: dict) -> None:
        self.sent[self.seq] = time.monotonic()
        self.sock.send(self.proto.encode_frame(kind, run=self.run, host="probe", rank=0, sender=self.sender,
                                               seq=self.seq, sent_at=time.time(), body=body))
        self.seq += 1

    def send_point(self) -> None:
        step = self.seq
        body = self.columns.metrics_body({0: "probe"}, array("i", [0]).tobytes(), array("d", [1.0]).tobytes(),
                                         array("q", [step]).tobytes(), None, None)
        self._send(self.proto.METRICS, body)

    def poll(self, timeout: float) -> None:
        if not self.sock.poll(int(timeout * 1000)):
            return
        while True:
            try:
                raw = self.sock.recv(self.zmq.NOBLOCK)
            except self.zmq.Again:
                return
            now = time.monotonic()
            for seq in self.proto.decode_ack(raw).seqs:
                at = self.sent.pop(seq, None)
                if at is not None:
                    self.latencies.append((at, now - at))

    def run_until(self, until: float) -> None:
        """Send one point every PROBE_EVERY_S until monotonic time `until`."""
        next_send = time.monotonic()
        while (now := time.monotonic()) < until:
            if now >= next_send:
                self.send_point()
                next_send += PROBE_EVERY_S
            self.poll(max(0.0, min(next_send, until) - time.monotonic()))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def stats(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    s = sorted(latencies)
    return {"n": len(s), "p50_ms": s[len(s) // 2] * 1e3, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3,
            "max_ms": s[-1] * 1e3}


def merged(run_dir: Path) -> bool:
    """The run's parts are merged into one and its WAL is gone."""
    parts = list((run_dir / "metrics").glob("part-*.parquet"))
    return len(parts) == 1 and not (run_dir / ".wal").exists()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000, help="distinct keys of the wide run (default 1,000,000)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from _common import ExternalCollector, RssSampler, machine_line, make_tmpdir, rmtree_quiet, write_json

    import pyarrow.parquet as pq

    print(machine_line())
    work = make_tmpdir("wide")
    collector = ExternalCollector(work).start()
    sampler = RssSampler(collector.proc.pid).start()
    wide = None
    probe = None
    failures = []
    try:
        probe = Probe(collector.endpoint)
        wide = subprocess.Popen([sys.executable, __file__, "--wide-rank", str(args.keys), str(collector.root),
                                 collector.endpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = wide.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"the wide rank did not start: {line}")
        run_dir = Path(line[1])
        probe.run_until(time.monotonic() + 2.0)
        baseline = [lat for _, lat in probe.latencies]
        probe.latencies.clear()
        began = time.monotonic()
        wide.stdin.write("go\n")
        wide.stdin.flush()
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(wide.stdout.readline()), daemon=True)
        reader.start()
        merged_at = None
        deadline = began + args.timeout
        while time.monotonic() < deadline:
            probe.run_until(time.monotonic() + 0.1)
            if lines and merged(run_dir):
                merged_at = time.monotonic()
                break
        ack_deadline = time.monotonic() + 5.0
        while probe.sent and time.monotonic() < ack_deadline:  # the last probe frames' acks
            probe.poll(0.05)
        during = [lat for _, lat in probe.latencies]
        unanswered = len(probe.sent)
        fields = lines[0].split() if lines else []
        if len(fields) != 4:
            failures.append(f"the wide rank did not finish within {args.timeout:.0f} s")
            log_s = finish_s = float("nan")
            finish_ok = False
        else:
            log_s, finish_s, finish_ok = float(fields[1]), float(fields[2]), fields[3] == "True"
        wide.wait(30)
        # pyarrow, not expman.open_run(): the reader takes minutes over 100,000+ keys (its own issue)
        rows = sum(pq.read_metadata(p).num_rows for p in (run_dir / "metrics").glob("part-*.parquet")) if merged_at else -1
        result = {
            "keys": args.keys, "baseline": stats(baseline), "during": stats(during), "probe_unanswered": unanswered,
            "wide_log_s": log_s, "wide_finish_s": finish_s, "wide_finish_ok": finish_ok,
            "wide_merged_s": (merged_at - began) if merged_at else None, "wide_rows": rows,
        }
    finally:
        if probe is not None:
            probe.close()
        if wide is not None and wide.poll() is None:
            wide.kill()
        sampler.stop()
        collector.close()
    peak_mb = sampler.peak / 1e6
    result["collector_peak_rss_mb"] = peak_mb
    b, d = result["baseline"], result["during"]
    print(f"\n== wide run: {args.keys:,} distinct keys finishing, another run's acks timed (one frame / 5 ms)")
    print(f"   probe ack latency, before: p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms, max {b['max_ms']:.1f} ms "
          f"({b['n']} frames)")
    print(f"   probe ack latency, while the wide run logs, finishes and merges: p50 {d['p50_ms']:.1f} ms, "
          f"p99 {d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms ({d['n']} frames, {unanswered} unanswered) "
          f"(target max <= {TARGET_MAX_S * 1e3:.0f} ms: {'MET' if d['max_ms'] <= TARGET_MAX_S * 1e3 else 'MISSED'})")
    print(f"   wide run: logging {log_s:.2f} s, finish() {finish_s:.2f} s -> {finish_ok}, "
          f"merged into one part {result['wide_merged_s'] or float('nan'):.2f} s after go; "
          f"{rows:,} rows read back (expected {args.keys:,})")
    print(f"   collector peak RSS {peak_mb:.0f} MB")
    if unanswered:
        failures.append(f"{unanswered} probe frames unanswered")
    if not finish_ok:
        failures.append("the wide run's finish() was not confirmed")
    if rows != args.keys:
        failures.append(f"{rows} rows of the wide run read back, expected {args.keys}")
    for f in failures:
        print(f"   FAILED: {f}")
    write_json(args.json, result)
    rmtree_quiet(work)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--wide-rank":
        sys.exit(wide_rank(sys.argv[2:]))
    sys.exit(main())
