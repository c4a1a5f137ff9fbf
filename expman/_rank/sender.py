"""The background thread that moves a process's logged data to its collector.

Every few milliseconds it drains each Experiment's buffers into frames, gives each
frame a sequence number, and keeps it until the collector acknowledges it. Frames that
stay unacknowledged are sent again (the collector drops duplicates), so a collector
that starts late, restarts or loses a connection costs nothing but time. Memory is
bounded: past `max_pending_bytes` further frames are spilled, byte for byte, to a spool
file on local disk (expman/_rank/spool.py) and read back in order as acks free memory; only
when the spool is full too are metric frames dropped, counted and reported (and the
count goes to the collector in the run's finish frame). At exit whatever is still
unacknowledged is written to the spool for `expman sync`.

The thread owns its ZeroMQ sockets; other threads talk to it only through an inproc
PUSH socket it polls (`wake`, `stop`).
"""

from __future__ import annotations

import heapq
import logging
import os
import struct
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import zmq

from expman._rank.channel import RunChannel
from expman._wire import frames as proto
from expman._wire.curve_keys import client_keys
from expman._rank.spool import Spool, spool_dir, write_final
from expman._rank.spool import max_spool_bytes as _spool_budget


log = logging.getLogger("expman")

FLUSH_INTERVAL_S = 0.002
SWITCH_INTERVAL_S = 0.001
RESEND_AFTER_S = 2.0  # at least; more when acks are slow (see _resend_after)
IDLE_POLL_MAX_S = 0.010  # an idle sender backs off from flush_interval to this
MAX_POINTS_PER_FRAME = 16384
MAX_PENDING_BYTES = 256 * 1024 * 1024
MAX_BUFFER_ENV = "EXPMAN_MAX_BUFFER_BYTES"
DROP_LOG_EVERY_S = 10.0
_FULL_KEY_TABLE = 256  # below this many keys every frame carries the whole table


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _fits_int64(step: Any) -> bool:
    return step is not None and _INT64_MIN <= step <= _INT64_MAX


def _pack_values(values: list[Any], run: RunChannel) -> bytes:
    try:
        return struct.pack(f"<{len(values)}d", *values)
    except (OverflowError, struct.error):  # an int too large for a float64: store it as ±inf, and say so
        log.error("expman: run %s: a metric value is too large for float64; stored as inf", run.uid)
        return struct.pack(f"<{len(values)}d", *(_clamp(v) for v in values))


def _clamp(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def _pack_steps(steps: list[Any], run: RunChannel) -> bytes | list[int | None]:
    """int64 binary when every point has a step, else a list with None (msgpack nil)."""
    try:
        return struct.pack(f"<{len(steps)}q", *steps)
    except struct.error:  # a None (no step), or out of range
        pass
    if all(s is None or _fits_int64(s) for s in steps):
        return steps
    log.error("expman: run %s: a step outside the int64 range is stored as no step", run.uid)
    return [s if _fits_int64(s) else None for s in steps]


def lower_switch_interval() -> None:
    """Let the sender thread in every 1 ms instead of Python's default 5 ms.

    While the training thread runs pure Python, this thread only gets the GIL when the
    interpreter forces a switch. At 5 ms it finds ~10k points waiting and holds the GIL
    ~1.5 ms packing them, which the training thread feels as one slow log call; at 1 ms
    the batches, and the stall, are five times smaller. Only ever lowers the interval;
    EXPMAN_SWITCH_INTERVAL=keep leaves it alone, a number of seconds sets the target.
    """
    setting = os.environ.get("EXPMAN_SWITCH_INTERVAL", "").strip()
    if setting == "keep":
        return
    try:
        target = float(setting) if setting else SWITCH_INTERVAL_S
    except ValueError:
        log.warning("expman: EXPMAN_SWITCH_INTERVAL=%r is not a number of seconds or 'keep'; ignored", setting)
        return
    if 0 < target < sys.getswitchinterval():
        sys.setswitchinterval(target)


@dataclass(slots=True)
class _Pending:
    seq: int
    run: RunChannel
    kind: str
    data: bytes
    points: int
    sent_at: float | None = None  # None: not sent yet (or due for a resend)
    first_sent_at: float | None = None
    resends: int = 0
    token: Any = None  # artifact chunks: told of the ack (expman/_rank/artifacts.py)
    size: int = 0  # len(data); data is None while the frame sits in the spool


@dataclass(slots=True)
class _Counters:
    sent: int = 0
    acked: int = 0
    dropped: int = 0
    spilled: int = 0
    pending: int = 0
    unacked_frames: int = 0


class Sender:
    """One per process and collector endpoint; shared by all Experiments that use it."""

    def __init__(
        self,
        endpoint: str,
        *,
        flush_interval: float = FLUSH_INTERVAL_S,
        max_pending_bytes: int | None = None,
        max_spool_bytes: int | None = None,
        on_idle_check: Any = None,
    ) -> None:
        proto.require_little_endian()
        lower_switch_interval()
        self.endpoint = endpoint
        self._curve = client_keys()  # $EXPMAN_CURVE_*: raises here, at start, on a bad key file
        self.sender_id = uuid.uuid4().hex
        self.flush_interval = flush_interval
        if max_pending_bytes is None:
            max_pending_bytes = int(os.environ.get(MAX_BUFFER_ENV) or MAX_PENDING_BYTES)
        self.max_pending_bytes = max_pending_bytes
        self.max_spool_bytes = _spool_budget(max_spool_bytes)
        self.max_points_per_frame = MAX_POINTS_PER_FRAME
        self._on_idle_check = on_idle_check  # called on resend rounds: restarts a dead local collector
        self._ctx = zmq.Context.instance()
        self._lock = threading.Lock()
        self._experiments: list[RunChannel] = []
        self._counters: dict[int, _Counters] = {}
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._unsent: deque[int] = deque()  # seqs to send, in order
        self._pending_bytes = 0
        self._low_heap: list[int] = []  # seqs of _pending, lazily cleaned: the oldest unacked
        self._spool: Spool | None = None  # frames past the memory budget (sender thread only)
        self._spooled: deque[_Pending] = deque()  # their entries, data None, in seq order
        self._spool_failed_at = -DROP_LOG_EVERY_S
        self._drop_logged_at = -DROP_LOG_EVERY_S
        self._exiting = False
        self._ack_latency = 0.0  # seconds, moving average
        self._busy = False  # this tick drained points
        self._next_seq = 0
        self._wake_addr = f"inproc://expman-sender-{self.sender_id}"
        self._wake_ready = threading.Event()
        self._wake_socket: zmq.Socket | None = None
        self._thread = threading.Thread(target=self._run, name="expman-sender", daemon=True)
        self._thread.start()
        self._wake_ready.wait(5.0)

    # --- called from user threads ------------------------------------------------------
    def tune(self, flush_interval: float | None, max_points_per_frame: int | None,
             max_buffer_bytes: int | None = None, max_spool_bytes: int | None = None) -> None:
        """Shared by every run of the process: the most eager request wins; the memory
        and spool budgets are the latest request's."""
        if max_buffer_bytes is not None:
            self.max_pending_bytes = max(int(max_buffer_bytes), 0)
        if max_spool_bytes is not None:
            self.max_spool_bytes = max(int(max_spool_bytes), 0)
        if flush_interval is not None:
            self.flush_interval = min(self.flush_interval, max(flush_interval, 0.001))
        if max_points_per_frame is not None:
            self.max_points_per_frame = min(self.max_points_per_frame, max(int(max_points_per_frame), 1))

    def register(self, run: RunChannel) -> None:
        with self._lock:
            self._experiments.append(run)
            self._counters[id(run)] = _Counters()
        self.wake()

    def unregister(self, run: RunChannel) -> None:
        with self._lock:
            if run in self._experiments and run.finished.is_set():
                self._experiments.remove(run)

    def stats_for(self, run: RunChannel) -> dict[str, int]:
        c = self._counters.get(id(run)) or _Counters()
        in_buffer = len(run.points) // 4 + len(run.texts)
        return {
            "sent": c.sent,
            "acked": c.acked,
            "buffered": in_buffer + c.pending,
            "dropped": c.dropped + run.late,
            "spilled": c.spilled,
            "unacked_frames": c.unacked_frames,
            "artifacts_stored": run.artifacts.stored,
            "artifacts_failed": run.artifacts.failed,
            "artifacts_pending": run.artifacts.open_jobs,
        }

    def wake(self) -> None:
        self._signal(b"wake")

    def stop(self, timeout: float = 2.0) -> None:
        self._signal(b"stop")
        self._thread.join(timeout)
        if self._thread.is_alive() and self._exiting:
            self._thread.join(60.0)  # writing what is unacknowledged to the spool
        with self._lock:
            if self._wake_socket is not None:
                self._wake_socket.close(0)
                self._wake_socket = None

    def _signal(self, msg: bytes) -> None:
        with self._lock:
            if self._wake_socket is None:
                self._wake_socket = self._ctx.socket(zmq.PUSH)
                self._wake_socket.setsockopt(zmq.LINGER, 0)
                self._wake_socket.connect(self._wake_addr)
            try:
                self._wake_socket.send(msg, zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake-up is already queued

    def active(self) -> list[RunChannel]:
        with self._lock:
            return list(self._experiments)

    # --- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        wake = self._ctx.socket(zmq.PULL)
        wake.bind(self._wake_addr)
        self._wake_ready.set()
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no connection: send fails and we keep the frame
        dealer.setsockopt(zmq.RECONNECT_IVL, 20)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 250)  # a restarted collector is found within 0.25 s
        dealer.setsockopt(zmq.SNDHWM, 1000)
        if self._curve is not None:
            self._curve.apply(dealer, self.endpoint)  # tcp only
        dealer.connect(self.endpoint)
        self._dealer = dealer
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        next_resend_check = time.monotonic() + RESEND_AFTER_S
        timeout = self.flush_interval
        try:
            while True:
                events = dict(poller.poll(timeout * 1000))
                if wake in events:
                    msgs = [wake.recv()]
                    while wake.poll(0):
                        msgs.append(wake.recv())
                    if b"stop" in msgs:
                        break
                if dealer in events:
                    self._read_acks(dealer)
                now = time.monotonic()
                self._busy = False
                for run in self.active():
                    try:
                        self._drain(run, now)
                    except Exception:  # one run's bad data must not stop the others
                        log.exception("expman: run %s: could not send its data", run.uid)
                if now >= next_resend_check:
                    next_resend_check = now + RESEND_AFTER_S / 2
                    self._mark_stale_for_resend(now)
                    if self._pending and self._on_idle_check is not None:
                        self._on_idle_check()
                if self._spooled:
                    self._load_from_spool()
                self._send_pending(dealer)
                # Wake every flush_interval while points flow; back off when idle (it costs CPU).
                timeout = self.flush_interval if self._busy or self._unsent else min(timeout * 2, IDLE_POLL_MAX_S)
        except zmq.ContextTerminated:
            pass
        except Exception:  # never let a bug here take the training process down
            log.exception("expman: the sender thread failed; logged data is no longer delivered")
        finally:
            self._exiting = True
            try:
                self._spill_at_exit()
            except Exception:
                log.exception("expman: could not write the unacknowledged frames to the spool; they are lost")
            dealer.close(0)
            wake.close(0)

    def _enqueue(self, run: RunChannel, kind: str, body: dict[str, Any], points: int = 0, token: Any = None) -> None:
        c = self._counters[id(run)]
        seq = self._next_seq
        data = proto.encode_frame(
            kind, run=run.uid, host=run.host, rank=run.rank, sender=self.sender_id,
            seq=seq, sent_at=time.time(), body=body, low=self._low(seq),
        )
        item = _Pending(seq, run, kind, data, points, token=token, size=len(data))
        # Past the memory budget (or while older frames wait in the spool: order) frames
        # go to the spool; only when it is full too are metrics dropped.
        if self._spooled or (self._pending and self._pending_bytes + len(data) > self.max_pending_bytes):
            if self._spill(item, force=kind != proto.METRICS):
                self._next_seq += 1
                c.spilled += points
                c.pending += points
                c.unacked_frames += 1
                return
            if kind == proto.METRICS:
                self._drop(run, c, points)
                return
        self._next_seq += 1
        self._pending[seq] = item
        heapq.heappush(self._low_heap, seq)
        self._unsent.append(seq)
        self._pending_bytes += len(data)
        c.pending += points
        c.unacked_frames += 1

    def _low(self, seq: int) -> int:
        """The oldest unacknowledged seq (in memory or spooled), else `seq`."""
        heap = self._low_heap
        while heap and heap[0] not in self._pending:
            heapq.heappop(heap)
        if len(heap) > 2 * len(self._pending) + 1024:  # acked seqs stuck behind an old one
            self._low_heap = heap = list(self._pending)
            heapq.heapify(heap)
        low = heap[0] if heap else seq
        if self._spooled:
            low = min(low, self._spooled[0].seq)
        return low

    def _drop(self, run: RunChannel, c: _Counters, points: int) -> None:
        c.dropped += points
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_EVERY_S:
            self._drop_logged_at = now
            log.error(
                "expman: run %s: collector at %s has not confirmed %d MB in memory and %d MB in the spool "
                "(%s); DROPPING points: %d dropped so far (raise max_buffer_bytes / max_spool_bytes, "
                "or check the collector)",
                run.uid, self.endpoint, self._pending_bytes >> 20,
                (self._spool.size if self._spool else 0) >> 20,
                self._spool.path if self._spool else "no spool", c.dropped,
            )

    def _intros(self, runs: Any) -> list[bytes]:
        """Hello frames without a seq: how a replayer introduces these runs to a collector."""
        out = []
        for run in runs:
            if run.hello is not None:
                out.append(proto.encode_frame(proto.HELLO, run=run.uid, host=run.host, rank=run.rank,
                                              sender=self.sender_id, seq=None, sent_at=time.time(),
                                              body=run.hello))
        return out

    def _spill(self, item: _Pending, force: bool) -> bool:
        if self._spool is None:
            if time.monotonic() - self._spool_failed_at < DROP_LOG_EVERY_S:
                return False
            folder = spool_dir()
            try:
                self._spool = Spool(folder, self.endpoint, self.sender_id, self._intros(self.active()),
                                    self.max_spool_bytes)
            except OSError as exc:
                self._spool_failed_at = time.monotonic()
                log.error("expman: cannot create a spool file in %s (%s): frames past the memory budget "
                          "are dropped", folder, exc)
                return False
            log.warning("expman: collector at %s is behind by %d MB; spilling further frames to %s",
                        self.endpoint, self._pending_bytes >> 20, self._spool.path)
        try:
            if not self._spool.append(item.data, force):
                return False
        except OSError as exc:
            log.error("expman: cannot write to the spool %s: %s", self._spool.path, exc)
            return False
        item.data = None  # type: ignore[assignment]
        self._spooled.append(item)
        return True

    def _load_from_spool(self) -> None:
        """Bring spooled frames back into memory, oldest first, as the budget allows."""
        spool = self._spool
        assert spool is not None
        while self._spooled and (not self._pending or self._pending_bytes + self._spooled[0].size <= self.max_pending_bytes):
            item = self._spooled.popleft()
            item.data = spool.read_next()
            self._pending[item.seq] = item
            heapq.heappush(self._low_heap, item.seq)
            self._unsent.append(item.seq)
            self._pending_bytes += item.size
        if not self._spooled:
            spool.close(delete=True)  # every frame is back in memory (and spilled again at exit)
            self._spool = None

    def _spill_at_exit(self) -> None:
        """Whatever the collector has not confirmed goes to the spool file, for `expman sync`."""
        spool, self._spool = self._spool, None
        if not self._pending and not self._spooled:
            if spool is not None:
                spool.close(delete=True)
            return
        in_memory = sorted(self._pending.values(), key=lambda p: p.seq)
        runs = {id(p.run): p.run for p in (*in_memory, *self._spooled)}
        frames = len(in_memory) + len(self._spooled)
        points = sum(p.points for p in in_memory) + sum(p.points for p in self._spooled)
        try:
            path = write_final(spool_dir() if spool is None else spool.path.parent, self.endpoint, self.sender_id,
                               self._intros(runs.values()), [p.data for p in in_memory],
                               spool.unread() if spool is not None else b"")
        finally:
            if spool is not None:
                spool.close(delete=False)
        log.error("expman: the collector at %s has not confirmed %d frames (%d points) of run(s) %s; "
                  "they are kept in %s: run `expman sync` to deliver them",
                  self.endpoint, frames, points, ", ".join(sorted(e.uid for e in runs.values())), path)

    def _drain(self, run: RunChannel, now: float) -> None:
        if not run.hello_sent:
            run.hello_sent = True
            self._enqueue(run, proto.HELLO, run.hello)
        request = run.finish_request
        artifacts_idle = run.artifacts.open_jobs == 0  # read first: the pump queues its frames before it says done
        if run.points:
            self._drain_points(run, run.points)
        elif run.texts:
            self._drain_points(run, [])
        while run.control:
            kind, payload = run.control.popleft()
            if kind == "params":
                self._enqueue(run, proto.PARAMS, {"params": payload})
            elif kind == "frame":  # prepared by the artifact pump: (kind, body, token)
                self._enqueue(run, payload[0], payload[1], token=payload[2])
            else:
                lines = [payload]
                while run.control and run.control[0][0] == "log":
                    lines.append(run.control.popleft()[1])
                self._enqueue(run, proto.LOG, {"lines": lines})
        if request is not None and not run.finish_sent and artifacts_idle:
            run.finish_sent = True
            dropped = self._counters[id(run)].dropped + run.late
            self._enqueue(run, proto.FINISH, {**request, "last_step": run.last_step, "dropped_points": dropped})
            self._check_finished(run)
        elif not run.finish_sent and now >= run.next_heartbeat:  # until finish is sent: artifacts may hold it back
            run.next_heartbeat = now + run.heartbeat_interval
            self._send_heartbeat(run)

    def _drain_points(self, run: RunChannel, buf: list[Any]) -> None:
        """Turn buffered points into metrics frames. This holds the GIL, so it is kept to
        C-level list slicing and `struct.pack` (about 60 ns a point, no Python loop)."""
        n = len(buf)
        self._busy = True
        texts: list[list[Any]] = []
        if run.texts:
            m = len(run.texts)
            texts = run.texts[:m]
            del run.texts[:m]
        step_width = 4 * self.max_points_per_frame
        for start in range(0, max(n, 1), step_width):
            stop = min(n, start + step_width)
            # Strided slices of the live list: items below n never move until the del below,
            # and the hot path only appends past them.
            ids = buf[start:stop:4]
            steps = buf[start + 2 : stop : 4]
            times = buf[start + 3 : stop : 4]
            values = buf[start + 1 : stop : 4]
            count = len(ids)
            used_texts, texts = texts, []
            names = run.key_names
            if len(names) <= _FULL_KEY_TABLE:
                keys = dict(enumerate(names[:]))
            else:
                keys = {i: names[i] for i in set(ids).union(t[0] for t in used_texts)}
            try:
                body = proto.metrics_body(
                    keys,
                    struct.pack(f"<{count}i", *ids),
                    _pack_values(values, run),
                    _pack_steps(steps, run),
                    None if times.count(None) == count else times,
                    used_texts,
                )
                if count and _fits_int64(steps[-1]):
                    run.last_step = steps[-1]
                self._enqueue(run, proto.METRICS, body, points=count + len(used_texts))
            except Exception:  # a bug must cost this batch, loudly, never the thread
                self._counters[id(run)].dropped += count + len(used_texts)
                log.exception("expman: run %s: could not pack %d points; DROPPED", run.uid, count + len(used_texts))
        del buf[:n]

    def _send_heartbeat(self, run: RunChannel) -> None:
        data = proto.encode_frame(
            proto.HEARTBEAT, run=run.uid, host=run.host, rank=run.rank, sender=self.sender_id,
            seq=None, sent_at=time.time(),
            body={"pid": os.getpid(), "last_step": run.last_step},
        )
        try:
            self._dealer.send(data, zmq.NOBLOCK)
        except zmq.Again:
            pass  # heartbeats are not kept: the next one says the same

    def _send_pending(self, dealer: zmq.Socket) -> None:
        now = time.monotonic()
        while self._unsent:
            item = self._pending.get(self._unsent[0])
            if item is None or item.sent_at is not None:
                self._unsent.popleft()  # acked meanwhile, or already resent
                continue
            try:
                dealer.send(item.data, zmq.NOBLOCK, copy=len(item.data) < 65536)
            except zmq.Again:
                return  # no connection or queue full: try again next tick
            self._unsent.popleft()
            item.sent_at = now
            if item.first_sent_at is None:
                item.first_sent_at = now
            if item.kind == proto.METRICS:
                self._counters[id(item.run)].sent += item.points

    def _resend_after(self) -> float:
        """Resend only frames unacknowledged for well past the usual ack latency, so a busy
        collector is not buried in duplicates; each resend of a frame doubles its wait."""
        return min(max(RESEND_AFTER_S, 4 * self._ack_latency), 30.0)

    def _mark_stale_for_resend(self, now: float) -> None:
        base = self._resend_after()
        for item in self._pending.values():
            if item.sent_at is not None and now - item.sent_at > base * 2 ** min(item.resends, 5):
                item.sent_at = None
                item.resends += 1
                self._unsent.append(item.seq)
                if item.kind == proto.METRICS:
                    self._counters[id(item.run)].sent -= item.points  # counted again when resent

    def _read_acks(self, dealer: zmq.Socket) -> None:
        while True:
            try:
                data = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ack = proto.decode_ack(data)
            except Exception as exc:
                log.warning("expman: ignoring a reply from the collector that is not an ack: %s", exc)
                continue
            if ack.unknown_runs:
                self._hello_again(set(ack.unknown_runs))
            for seq in ack.seqs:
                item = self._pending.pop(seq, None)
                if item is None:
                    continue  # a duplicate ack after a resend
                self._pending_bytes -= len(item.data)
                if item.first_sent_at is not None and item.resends == 0:
                    latency = time.monotonic() - item.first_sent_at
                    self._ack_latency += 0.2 * (latency - self._ack_latency)
                c = self._counters[id(item.run)]
                c.pending -= item.points
                c.unacked_frames -= 1
                if item.kind == proto.METRICS:
                    c.acked += item.points
                    if item.sent_at is None:  # acked while waiting for a resend
                        c.sent += item.points
                details = ack.info.get(seq) or {}
                if details.get("run_dir"):
                    item.run.confirm_run_dir(details["run_dir"])
                if item.token is not None:
                    item.token.acked(details.get("rejected"))  # the pump logs and counts its own refusals
                elif details.get("rejected"):
                    c.dropped += item.points
                    c.acked -= item.points if item.kind == proto.METRICS else 0
                    log.error("expman: run %s: the collector rejected a %s frame (%d points): %s",
                              item.run.uid, item.kind, item.points, details["rejected"])
                self._check_finished(item.run)

    def _hello_again(self, run_ids: set[str]) -> None:
        """The collector does not know these runs (it restarted): introduce them again."""
        for run in self.active():
            if run.uid in run_ids and not any(p.run is run and p.kind == proto.HELLO for p in self._pending.values()):
                self._enqueue(run, proto.HELLO, {**run.hello, "reopen": True})

    def _check_finished(self, run: RunChannel) -> None:
        c = self._counters[id(run)]
        if run.finish_sent and c.unacked_frames == 0:
            run.finished.set()
