"""The background thread that moves a process's logged data to its collector.

Every few milliseconds it drains each run's channel (expman/_rank/channel.py) into
frames: first the run's point ring (its columns sliced into a frame's; a frame's slots
are freed once it is acknowledged, spooled or dropped), then the run's list (a slow run's
few points wait up to a send window to share one frame: the SendWindow rule in
expman/_wire/delivery.py), gives each frame a sequence number and
keeps it in its Outbox until the collector acknowledges it; when to send and resend is
the Outbox's rule (expman/_wire/delivery.py), so a collector that starts late, restarts
or loses a connection costs nothing but time.
Memory is bounded: past `max_pending_bytes` further frames are spilled to a spool file
(expman/_rank/overflow.py) and read back in order as acks free memory; only when the
spool is full too are metric frames dropped, counted and reported (and the count goes to
the collector in the run's finish frame). At exit whatever is still unacknowledged is
kept in the spool for `expman sync`. A frame the collector rejects is counted and never
resent.

The thread owns its ZeroMQ sockets; other threads talk to it only through an inproc
PUSH socket it polls (`wake`, `stop`).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from expman._rank.channel import RunChannel
from expman._rank.dealer import connect, read_acks, send_due
from expman._rank.device import DeviceBatch
from expman._wire import columns
from expman._wire import frames as proto
from expman._wire.curve_keys import client_keys
from expman._wire.delivery import RESEND_AFTER_S, SEND_WINDOW_S, Entry, Outbox, SendWindow
from expman._rank.overflow import Overflow
from expman._rank.spool import max_spool_bytes as spool_budget
from expman._storage.ring import AHEAD_SLOTS, FIRST_SLOTS


log = logging.getLogger("expman")

FLUSH_INTERVAL_S = 0.002
SWITCH_INTERVAL_S = 0.0005
YIELD_S = 0.00005  # between two frames of one drain the sender sleeps this long: the training thread runs
RING_SENT_GRACE_S = 0.05  # a ring more than half full frees the slots of frames handed to ZeroMQ this long ago
IDLE_POLL_MAX_S = 0.050  # an idle sender backs off from flush_interval to this (half a send window)
ACK_WAIT_POLL_MAX_S = 30.0  # once only acks are awaited, it wakes for them, for a new connection, or after this long
MAX_POINTS_PER_FRAME = 16384  # its longest C call (one struct.pack) ~180 µs: the GIL switches between them
MAX_CONSOLE_LINES_PER_FRAME = 4096
MAX_PENDING_BYTES = 256 * 1024 * 1024
MAX_BUFFER_ENV = "EXPMAN_MAX_BUFFER_BYTES"
SEND_WINDOW_ENV = "EXPMAN_SEND_WINDOW"
DROP_LOG_EVERY_S = 10.0


_STEP = struct.Struct("<q")


def _key_table(key_names: list[str], ids: bytes, texts: list[list[Any]]) -> dict[int, str]:
    """A frame's key table: every key while there are few, else the frame's own."""
    if len(key_names) <= columns.FULL_KEY_TABLE:
        return dict(enumerate(key_names[:]))
    return {i: key_names[i] for i in set(memoryview(ids).cast("i")).union(t[0] for t in texts)}


def lower_switch_interval() -> None:
    """Switch threads every 0.5 ms instead of Python's default 5 ms.

    While the training thread runs pure Python, this thread only gets the GIL when the
    interpreter forces a switch, and the training thread gets it back the same way: a
    thread waiting for the GIL asks for it only after the switch interval. At 5 ms the
    sender finds ~10k points waiting and holds the GIL ~1.5 ms packing them, which the
    training thread feels as one slow log call; at 0.5 ms the training thread is back
    within 0.5 ms plus the sender's longest C call (~180 µs). Only ever lowers the
    interval; EXPMAN_SWITCH_INTERVAL=keep leaves it alone, a number of seconds sets the
    target.
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


def send_window() -> SendWindow:
    """The batching rule, with $EXPMAN_SEND_WINDOW (seconds; 0 sends every tick) if set."""
    setting = os.environ.get(SEND_WINDOW_ENV, "").strip()
    try:
        return SendWindow(float(setting) if setting else SEND_WINDOW_S)
    except ValueError:
        log.warning("expman: %s=%r is not a number of seconds; using %g", SEND_WINDOW_ENV, setting, SEND_WINDOW_S)
        return SendWindow()


@dataclass(slots=True)
class _Frame:
    """What the sender knows of a frame in its Outbox (the Entry's tag)."""

    run: RunChannel
    kind: str
    points: int
    token: Any = None  # artifact chunks: told of the ack (expman/_rank/artifacts.py)
    ring_end: int = -1  # a frame of the ring's points: the end of its range
    settled: bool = False  # stored, spooled or dropped: its ring slots may be reused
    sent_at: float | None = None  # monotonic: when it was first handed to ZeroMQ


@dataclass(slots=True)
class _Counters:
    sent: int = 0
    acked: int = 0
    dropped: int = 0
    spilled: int = 0
    rejected: int = 0
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
        self.max_spool_bytes = spool_budget(max_spool_bytes)
        self.max_points_per_frame = MAX_POINTS_PER_FRAME
        self._window = send_window()
        self._held_since: dict[int, float] = {}  # id(run) -> when its waiting points were first seen (sender thread)
        self._on_idle_check = on_idle_check  # called on resend rounds: restarts a dead local collector
        self._ctx = zmq.Context.instance()
        self._lock = threading.Lock()
        self._experiments: list[RunChannel] = []
        self._counters: dict[int, _Counters] = {}
        self._outbox = Outbox()  # unacknowledged frames in memory (sender thread only)
        self._overflow = Overflow(endpoint, self.sender_id, lambda: self._intros(self.active()))  # sender thread only
        self._drop_logged_at = -DROP_LOG_EVERY_S
        self._exiting = False
        self._busy = False  # this tick drained points
        self._lost_connection = False  # a connection went down since the last one was made (sender thread)
        self.heard_from_collector = False  # any ack at all: a CURVE refusal or a wrong endpoint never gives one
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
        if run.ring is not None:
            run.ring.wake = self.wake  # the hot path caught up with the ring's mapped slots: map more
        self.wake()

    def unregister(self, run: RunChannel) -> None:
        with self._lock:
            if run in self._experiments and run.finished.is_set():
                self._experiments.remove(run)

    def stats_for(self, run: RunChannel) -> dict[str, int]:
        c = self._counters.get(id(run)) or _Counters()
        waiting = sum(len(batch.points) for batch in list(run.device_batches))  # a copy: the sender appends
        in_buffer = (len(run.points) + waiting) // 4 + len(run.texts) + run.unframed()
        return {
            "sent": c.sent,
            "acked": c.acked,
            "buffered": in_buffer + c.pending,
            "dropped": c.dropped + run.late,
            "spilled": c.spilled,
            "rejected": c.rejected,
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
        self._dealer = dealer = connect(self._ctx, self.endpoint, self._curve)
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        next_resend_check = time.monotonic() + RESEND_AFTER_S
        timeout = self.flush_interval
        next_tick = time.monotonic()
        try:
            while True:
                # Frames the socket refused (no connection yet, or its queue is full) go when it
                # can take them: ZeroMQ says so (POLLOUT), the loop need not try every tick.
                poller.modify(dealer, zmq.POLLIN | zmq.POLLOUT if self._outbox.has_due else zmq.POLLIN)
                # whole ms, rounded up: pyzmq truncates, and a 0 ms poll until the tick would spin
                events = dict(poller.poll(math.ceil(max(next_tick - time.monotonic(), 0.0) * 1000)))
                woken = wake in events
                if woken:
                    msgs = [wake.recv()]
                    while wake.poll(0):
                        msgs.append(wake.recv())
                    if b"stop" in msgs:
                        break
                if monitor in events:
                    self._connection_events(monitor)
                if events.get(dealer, 0) & zmq.POLLIN:
                    self._read_acks(dealer)
                    self._window.follow(self._outbox.ack_latency)
                    at = time.monotonic()
                    if next_tick - at > IDLE_POLL_MAX_S:  # a long wait: acks may make a resend due
                        next_tick = min(next_tick, at + self._acks_only_timeout(at))
                now = time.monotonic()
                if not woken and now < next_tick:  # only acks: the runs are drained on the tick's pace
                    if self._overflow:
                        self._overflow.load_into(self._outbox, self.max_pending_bytes)
                    self._send_pending(dealer)
                    continue
                self._busy = False
                for run in self.active():
                    try:
                        self._drain(run, now)
                    except Exception:  # one run's bad data must not stop the others
                        log.exception("expman: run %s: could not send its data", run.uid)
                if now >= next_resend_check:
                    next_resend_check = now + RESEND_AFTER_S / 2
                    self._expire(now)
                    if self._outbox and self._on_idle_check is not None:
                        self._on_idle_check()
                if self._overflow:
                    self._overflow.load_into(self._outbox, self.max_pending_bytes)
                self._send_pending(dealer)
                # Wake every flush_interval while points flow; back off when idle (it costs CPU).
                if self._busy:
                    timeout = self.flush_interval
                elif self._outbox and all(run.finish_sent for run in self.active()):
                    timeout = self._acks_only_timeout(now)
                else:
                    timeout = min(timeout * 2, IDLE_POLL_MAX_S)
                if self._held_since:  # be back when the first held points are due
                    timeout = max(min(timeout, self._window.ends(min(self._held_since.values())) - now),
                                  self.flush_interval)
                next_tick = now + timeout
        except zmq.ContextTerminated:
            pass
        except Exception:  # never let a bug here take the training process down
            log.exception("expman: the sender thread failed; logged data is no longer delivered")
        finally:
            self._exiting = True
            try:
                self._overflow.keep_at_exit(self._outbox)
                for run in self.active():
                    run.forget_ring()  # what it held is in the spool now
            except Exception:
                log.exception("expman: could not write the unacknowledged frames to the spool; they are lost")
            dealer.disable_monitor()
            monitor.close(0)
            dealer.close(0)
            wake.close(0)

    def _acks_only_timeout(self, now: float) -> float:
        """Every run sent its finish and only acks are awaited (finish() waiting on a slow
        or stopped collector). Nothing new can come but what ends the poll at once: an
        ack, a wake-up (a new run, a stop), a new connection (`_connection_events`), the
        socket taking refused frames. So sleep until a frame the collector left unanswered
        is due again (`Outbox.next_resend_at`; a local collector gone: the next resend
        round, which starts it again). A wake-up costs ~3-30 ms of CPU on a VM's cold
        core, however little it does (docs/architecture.md "Scaling"), and a waiting rank
        must cost next to nothing."""
        if self._lost_connection and self._on_idle_check is not None:
            return RESEND_AFTER_S / 2  # a local collector died: the resend rounds start it again
        resend_at = self._outbox.next_resend_at()
        if resend_at is None:
            return ACK_WAIT_POLL_MAX_S
        # a resend round's width past it, so frames due together go together
        return min(max(resend_at + RESEND_AFTER_S / 2 - now, self.flush_interval), ACK_WAIT_POLL_MAX_S)

    def _connection_events(self, monitor: zmq.Socket) -> None:
        """The dealer's connection went down or came up (ZeroMQ's socket monitor). What the
        old connection still queued is lost with it, so once a new one is made every
        unacknowledged frame goes again (the collector drops duplicates); a local
        collector that went away while frames wait for it is started again."""
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._lost_connection = True
                if self._outbox and self._on_idle_check is not None:  # not when an idle one exits
                    self._on_idle_check()
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._lost_connection:
                self._lost_connection = False
                self._count_resends(self._outbox.resend_all())

    def _enqueue(self, run: RunChannel, kind: str, body: dict[str, Any], points: int = 0, token: Any = None,
                 ring_end: int = -1) -> None:
        c = self._counters[id(run)]
        seq = self._next_seq
        data = proto.encode_frame(
            kind, run=run.uid, host=run.host, rank=run.rank, sender=self.sender_id,
            seq=seq, sent_at=time.time(), body=body, low=self._low(seq),
        )
        frame = _Frame(run, kind, points, token, ring_end)
        if ring_end >= 0:
            run.ring_frames.append(frame)
        item = Entry(seq, data, len(data), tag=frame)
        # Past the memory budget (or while older frames wait in the spool: order) frames
        # go to the spool; only when it is full too are metrics dropped.
        if self._overflow or (self._outbox and self._outbox.bytes + len(data) > self.max_pending_bytes):
            frame.settled = True  # in the spool (`expman sync` has it) or dropped: the ring need not keep it
            if self._overflow.spill(item, kind != proto.METRICS, self.max_spool_bytes, self._outbox.bytes):
                self._next_seq += 1
                c.spilled += points
                c.pending += points
                c.unacked_frames += 1
                return
            if kind == proto.METRICS:
                self._drop(run, c, points)
                return
        self._next_seq += 1
        self._outbox.add(item)
        c.pending += points
        c.unacked_frames += 1

    def _low(self, seq: int) -> int:
        """The oldest unacknowledged seq (in memory or spooled), else `seq`."""
        return self._overflow.low(self._outbox.low(seq))

    def _drop(self, run: RunChannel, c: _Counters, points: int) -> None:
        c.dropped += points
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_EVERY_S:
            self._drop_logged_at = now
            log.error(
                "expman: run %s: collector at %s has not confirmed %d MB in memory and %d MB in the spool "
                "(%s); DROPPING points: %d dropped so far (raise max_buffer_bytes / max_spool_bytes, "
                "or check the collector)",
                run.uid, self.endpoint, self._outbox.bytes >> 20, self._overflow.size >> 20,
                self._overflow.where, c.dropped,
            )

    def _intros(self, runs: Any) -> list[bytes]:
        """Hello frames without a seq: how a replayer introduces these runs to a collector."""
        return [proto.encode_frame(proto.HELLO, run=run.uid, host=run.host, rank=run.rank, sender=self.sender_id,
                                   seq=None, sent_at=time.time(), body=run.hello)
                for run in runs if run.hello is not None]

    def _drain(self, run: RunChannel, now: float) -> None:
        if not run.hello_sent:
            run.hello_sent = True
            self._enqueue(run, proto.HELLO, run.hello)
        request = run.finish_request
        artifacts_idle = run.artifacts.open_jobs == 0  # read first: the pump queues its frames before it says done
        ring = run.ring
        if ring is not None and 0 <= ring.ready < ring.capacity:
            # The hot path's next pages, mapped here rather than faulted there: a few drains' worth
            # of the run's pace ahead of it, so an idle or slow run holds little.
            ahead = min(max(FIRST_SLOTS, 4 * run.unframed()), AHEAD_SLOTS)
            if ring.n + ahead // 2 > ring.ready:
                ring.grow(ring.n + ahead)
        if ring is not None and ring.n - ring.settled > ring.capacity // 2:
            # Acks lag (a busy collector): free the slots of frames handed to ZeroMQ a while ago
            # rather than let the ring fill and the newest points wait in the list.
            run.settle_ring(sent_before=now - RING_SENT_GRACE_S)
        if run.held or run.device_batches:  # device values are never held back: they wait for their copy
            self._held_since.pop(id(run), None)
            self._drain_ring(run)  # the ring's points come before the list's
            self._drain_device_points(run)
        elif run.points or run.texts or run.unframed():
            waiting = run.unframed() + len(run.points) // columns.POINT_STRIDE + len(run.texts)
            since = self._held_since.get(id(run))
            if request is None and self._window.holds(waiting, since, now):
                if since is None:
                    self._held_since[id(run)] = now
            else:
                self._held_since.pop(id(run), None)
                self._drain_ring(run)
                if run.points or run.texts:
                    self._drain_points(run, run.points)
                run.open_ring()
        if run.console:
            self._drain_console(run)
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
        if request is not None and not run.finish_sent and artifacts_idle and not run.device_batches \
                and not run.unframed():
            run.finish_sent = True
            dropped = self._counters[id(run)].dropped + run.late
            self._enqueue(run, proto.FINISH, {**request, "last_step": run.last_step, "dropped_points": dropped})
            self._check_finished(run)
        elif not run.finish_sent and now >= run.next_heartbeat:  # until finish is sent: artifacts may hold it back
            run.next_heartbeat = now + run.heartbeat_interval
            self._send_heartbeat(run)

    def _drain_console(self, run: RunChannel) -> None:
        """Printed lines go as log lines, many to a frame: one slice of the list, no loop."""
        lines = run.console
        n = len(lines)
        for start in range(0, n, MAX_CONSOLE_LINES_PER_FRAME):
            self._enqueue(run, proto.LOG, {"lines": lines[start : min(n, start + MAX_CONSOLE_LINES_PER_FRAME)]})
        del lines[:n]

    def _drain_device_points(self, run: RunChannel) -> None:
        """Points among which are held device tensors (expman/_rank/device.py): the slice
        waits, in order, until its values are read without a sync; later points of the run
        queue behind it."""
        self._busy = True
        buf = run.points
        n = len(buf)
        if n:
            held, chunk = run.held, buf[:n]
            del buf[:n]
            run.held -= held
            run.device_batches.append(DeviceBatch(chunk, lambda message: log.error("expman: run %s: %s", run.uid, message)))
        while run.device_batches and run.device_batches[0].ready():
            batch = run.device_batches.popleft()
            self._counters[id(run)].dropped += batch.failed
            self._drain_points(run, batch.points)
        run.open_ring()

    def _drain_ring(self, run: RunChannel) -> None:
        """Turn the ring's unframed points into metrics frames: each frame's columns are
        slices of the ring's (expman/_storage/ring.py), so no C call holds the GIL for
        long; the ring's table names each frame before it can leave."""
        ring = run.ring
        if ring is None or ring.n <= run.ring_framed:
            return
        self._busy = True
        start, end = run.ring_framed, ring.n
        texts: list[list[Any]] = []
        if run.texts:
            m = len(run.texts)
            texts = run.texts[:m]
            del run.texts[:m]
        for a in range(start, end, self.max_points_per_frame):
            if a > start:
                time.sleep(YIELD_S)  # the training thread takes the GIL between frames (docs/architecture.md)
            b = min(end, a + self.max_points_per_frame)
            used_texts, texts = texts, []
            points = b - a + len(used_texts)
            seq = self._next_seq  # the frame's, unless it is dropped
            try:
                ids, values, steps, times = ring.columns(a, b)
                body = columns.metrics_body(_key_table(run.key_names, ids, used_texts), ids, values, steps, times,
                                            used_texts)
                last = steps[-1] if isinstance(steps, list) else _STEP.unpack_from(steps, len(steps) - _STEP.size)[0]
                if last is not None:
                    run.last_step = last
                self._enqueue(run, proto.METRICS, body, points=points, ring_end=b)
            except Exception:  # a bug must cost this batch, loudly, never the thread
                self._counters[id(run)].dropped += points
                run.ring_frames.append(_Frame(run, proto.METRICS, points, ring_end=b, settled=True))
                log.exception("expman: run %s: could not pack %d points; DROPPED", run.uid, points)
            run.framed(seq if self._next_seq > seq else None, b)
        run.settle_ring()  # frames that went to the spool

    def _drain_points(self, run: RunChannel, buf: list[Any]) -> None:
        """Turn buffered points into metrics frames (expman/_wire/columns.py packs them)."""
        n = len(buf)
        self._busy = True
        texts: list[list[Any]] = []
        if run.texts:
            m = len(run.texts)
            texts = run.texts[:m]
            del run.texts[:m]
        step_width = columns.POINT_STRIDE * self.max_points_per_frame

        def warn(message: str) -> None:
            log.error("expman: run %s: %s", run.uid, message)

        for start in range(0, max(n, 1), step_width):
            if start:
                time.sleep(YIELD_S)
            used_texts, texts = texts, []
            points = min(n - start, step_width) // columns.POINT_STRIDE + len(used_texts)
            try:
                body, _count, last_step = columns.pack(buf, start, min(n, start + step_width), run.key_names,
                                                       used_texts, warn)
                if last_step is not None:
                    run.last_step = last_step
                self._enqueue(run, proto.METRICS, body, points=points)
            except Exception:  # a bug must cost this batch, loudly, never the thread
                self._counters[id(run)].dropped += points
                log.exception("expman: run %s: could not pack %d points; DROPPED", run.uid, points)
        # Off the list, a frame's worth at a time from the back of what was taken: each del
        # moves only what the hot path appended meanwhile, and frees at most one frame's
        # items, so no single C call holds the GIL long (between them the training thread
        # can take it: the switch interval).
        for stop in range(n, 0, -step_width):
            del buf[max(0, stop - step_width):stop]

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
        for entry in send_due(dealer, self._outbox, now):
            if entry.tag.kind == proto.METRICS:
                self._counters[id(entry.tag.run)].sent += entry.tag.points
                if entry.tag.sent_at is None:
                    entry.tag.sent_at = now

    def _expire(self, now: float) -> None:
        self._count_resends(self._outbox.expire(now))

    def _count_resends(self, entries: list[Entry]) -> None:
        for entry in entries:
            if entry.tag.kind == proto.METRICS:
                self._counters[id(entry.tag.run)].sent -= entry.tag.points  # counted again when resent

    def _read_acks(self, dealer: zmq.Socket) -> None:
        for ack in read_acks(dealer):
            self.heard_from_collector = True
            if ack.unknown_runs:
                self._hello_again(set(ack.unknown_runs))
            for seq in ack.seqs:
                entry = self._outbox.acked(seq, time.monotonic())
                if entry is not None:
                    self._settle(entry, ack.info.get(seq) or {})

    def _settle(self, entry: Entry, details: dict[str, Any]) -> None:
        """Account for one acknowledged frame: stored, or rejected (dropped and counted,
        never resent)."""
        frame: _Frame = entry.tag
        c = self._counters[id(frame.run)]
        c.pending -= frame.points
        c.unacked_frames -= 1
        if frame.ring_end >= 0 and not frame.settled:
            frame.settled = True
            frame.run.settle_ring()
        if frame.kind == proto.METRICS:
            c.acked += frame.points
            if entry.sent_at is None:  # acked while waiting for a resend
                c.sent += frame.points
        if details.get("run_dir"):
            frame.run.confirm_run_dir(details["run_dir"])
        rejected = details.get("rejected")
        if frame.token is not None:
            frame.token.acked(rejected)  # the pump logs and counts its own refusals
        elif rejected:
            c.rejected += frame.points or 1
            if frame.kind == proto.METRICS:
                c.acked -= frame.points
            log.error("expman: run %s: the collector rejected a %s frame (%d points); it is not resent: %s",
                      frame.run.uid, frame.kind, frame.points, rejected)
        self._check_finished(frame.run)

    def _hello_again(self, run_ids: set[str]) -> None:
        """The collector does not know these runs (it restarted): introduce them again, and
        send again, behind the hello on the same connection, the run's frames that went out
        before it (the collector refused those; frames sent after the hello are taken)."""
        for run in self.active():
            if run.uid not in run_ids:
                continue
            hello = next((p for p in self._outbox.entries.values() if p.tag.run is run and p.tag.kind == proto.HELLO),
                         None)
            if hello is None:
                self._enqueue(run, proto.HELLO, {**run.hello, "reopen": True})
            before = hello.sent_order if hello is not None and hello.sent_at is not None else None
            self._count_resends(self._outbox.resend_where(
                lambda entry: entry.tag.run is run and entry.tag.kind != proto.HELLO
                and (before is None or entry.sent_order < before)))

    def _check_finished(self, run: RunChannel) -> None:
        c = self._counters[id(run)]
        if run.finish_sent and c.unacked_frames == 0:
            run.finished.set()
