"""The collector's receive loop: frames in, write-ahead log, acknowledgements out.

One thread. Each turn it takes every frame that is waiting (up to a batch), persists
them (WAL append, run.log, YAML), makes the batch durable with one fsync per run, and
only then acknowledges the sequence numbers to their senders. Periodic work (Parquet
flushes, run.yaml updates, missing heartbeats) happens between turns.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import zmq

from expman._wire import frames as proto
from expman._storage.rows import frame_table
from expman._wire.curve_keys import ClientKeys
from expman._errors import ProtocolError
from expman._storage.layout import HOSTS_DIR, RUN_YAML, read_yaml, write_yaml_atomic
from expman._wire.limits import check_name

from ._auth import ZAP_DOMAIN, CurvePolicy, CurveServer, ZapHandler
from ._hardware import HardwareMonitor
from ._artifacts import ArtifactService, ArtifactSettings, Deferred
from expman._wire.limits import check_envelope
from ._relay import Relay
from ._runs import Run, find_run_dir

log = logging.getLogger("expman.collector")

RECV_BATCH = 128  # frames per turn: bounds the rows decoded before the next flush
RECV_BATCH_BYTES = 64 * 1024 * 1024  # artifact chunks are up to 1 MiB: bound a turn's memory
FLUSH_INTERVAL_S = 0.5
FLUSH_ROWS = 262_144
FORGET_FINISHED_AFTER_S = 600.0
IDLE_GRACE_S = 3.0
PERSIST_FAILURE_LOG_EVERY_S = 30.0


class SeqWindow:
    """The sequence numbers seen from one sender: a floor plus sorted [lo, hi] ranges above it.

    Each frame also says below which seq the sender has everything acknowledged (`low`);
    those never come again, so the floor moves up to it. Ranges keep the window small
    even when a restarted collector is seeded with the frames its predecessors stored.
    """

    __slots__ = ("floor", "ranges")

    def __init__(self) -> None:
        self.floor = 0  # every seq below this has been seen (or will never be sent again)
        self.ranges: list[list[int]] = []  # disjoint, sorted, all above the floor

    def raise_floor(self, low: int) -> None:
        if low > self.floor:
            self.floor = low
            self._normalize()

    def seen(self, seq: int) -> bool:
        if seq < self.floor:
            return True
        i = bisect.bisect_right(self.ranges, [seq, float("inf")]) - 1
        return i >= 0 and self.ranges[i][0] <= seq <= self.ranges[i][1]

    def add(self, seq: int) -> None:
        self.add_range(seq, seq)

    def add_range(self, lo: int, hi: int) -> None:
        bisect.insort(self.ranges, [lo, hi])
        self._normalize()

    def _normalize(self) -> None:
        merged: list[list[int]] = []
        for lo, hi in self.ranges:
            if hi < self.floor:
                continue
            if lo <= self.floor:
                self.floor = hi + 1
                continue
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        while merged and merged[0][0] <= self.floor:  # the floor may have grown into them
            self.floor = max(self.floor, merged.pop(0)[1] + 1)
        self.ranges = merged


class Collector:
    def __init__(
        self,
        root: Path,
        binds: list[str],
        *,
        parent_pid: int | None = None,
        heartbeat_timeout: float | None = None,
        max_frame_bytes: int = proto.MAX_FRAME_BYTES,
        idle_exit: float | None = None,
        forward: str | None = None,
        name: str | None = None,
        hardware_interval: float = 1.0,
        artifacts: ArtifactSettings | None = None,
        curve: CurveServer | None = None,
        forward_keys: ClientKeys | None = None,
    ) -> None:
        self.root = root
        self.name = check_name("collector", name or socket.gethostname())  # the writer of its parts
        self.hardware = HardwareMonitor(root, interval=hardware_interval, writer=self.name,  # samples on its own thread
                                        local_only=all(b.startswith("ipc://") for b in binds))
        self.parent_pid = parent_pid
        self.idle_exit = idle_exit  # exit after this long with no running rank and no frame
        # A fresh collector waits at least IDLE_GRACE_S for its first frame: a rank that was
        # reconnecting to its predecessor needs a moment to find it.
        self._last_frame_at = time.monotonic() + max(0.0, IDLE_GRACE_S - (idle_exit or 0.0))
        self.heartbeat_timeout = heartbeat_timeout
        self.max_frame_bytes = max_frame_bytes
        self.runs: dict[str, Run] = {}
        self.artifacts = ArtifactService(artifacts)
        self.windows: dict[str, SeqWindow] = defaultdict(SeqWindow)
        self.counters: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 1000)
        self._router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + 1024)
        self._router.setsockopt(zmq.RCVHWM, 10000)
        self.zap: ZapHandler | None = None
        self.endpoints = self._bind_all(binds, curve)
        self._stop_pull = self._ctx.socket(zmq.PULL)
        self._stop_addr = f"inproc://collector-stop-{id(self)}"
        self._stop_pull.bind(self._stop_addr)
        self._stopping = False
        self._failing_since: float | None = None  # monotonic time of the first failed write, until one works
        self._failure_logged_at = 0.0
        self._refused_while_failing = 0
        self._poller = zmq.Poller()
        self.relay = Relay(self._ctx, forward, self._poller, forward_keys) if forward else None
        # Called with the loop's monotonic time after each round of periodic work (the
        # daemon's sd_notify watchdog and status); must be quick and must not raise.
        self.on_periodic: Callable[[float], None] | None = None

    def _bind_all(self, binds: list[str], curve: CurveServer | None) -> list[str]:
        """ipc endpoints first, plain; then, with `curve`, the ZAP handler and the CURVE
        server options, which libzmq copies into each endpoint at bind: tcp only."""
        bound: dict[int, str] = {}
        order = sorted(range(len(binds)), key=lambda i: not binds[i].startswith("ipc://"))
        for i in order:
            if binds[i].startswith("tcp://"):
                if curve is None:
                    log.warning("%s has no CURVE keys (--curve-secret): anyone who reaches it can write runs", binds[i])
                elif self.zap is None:
                    self.zap = ZapHandler(self._ctx, CurvePolicy(curve.allowed), self.rejects, monitor=self._router)
                    self._router.curve_secretkey = curve.secret
                    self._router.curve_publickey = curve.public
                    self._router.curve_server = True
                    self._router.zap_domain = ZAP_DOMAIN.encode()
            bound[i] = self._bind(binds[i])
        if curve is not None and self.zap is None:
            log.warning("CURVE keys given but no tcp endpoint to use them on (ipc endpoints rely on file permissions)")
        return [bound[i] for i in range(len(binds))]

    def _bind(self, endpoint: str) -> str:
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"  # let the kernel pick; report what it chose
        if endpoint.startswith("ipc://"):
            Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
        self._router.bind(endpoint)
        return self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    def request_stop(self) -> None:
        """Safe from a signal handler or another thread: the loop wakes and exits cleanly."""
        sock = self._ctx.socket(zmq.PUSH)
        sock.connect(self._stop_addr)
        sock.send(b"stop")
        sock.close(1000)

    # --- the loop ----------------------------------------------------------------------
    def serve(self) -> None:
        poller = self._poller
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._stop_pull, zmq.POLLIN)
        zap_sockets = self.zap.sockets() if self.zap is not None else []
        for sock in zap_sockets:
            poller.register(sock, zmq.POLLIN)
        next_periodic = 0.0
        try:
            while not self._stopping:
                events = dict(poller.poll(100))
                if self._stop_pull in events:
                    break
                if self.zap is not None and any(sock in events for sock in zap_sockets):
                    self.zap.handle()
                if self._router in events:
                    self._turn()
                if self.relay is not None:
                    for sock in self.relay.sockets():
                        if sock in events:
                            self.relay.pass_back(sock, self._router)
                now = time.monotonic()
                if now >= next_periodic:
                    next_periodic = now + 0.1
                    self._periodic(now)
        finally:
            self._shutdown()

    def _turn(self) -> None:
        messages = []
        size = 0
        for _ in range(RECV_BATCH):
            try:
                messages.append(self._router.recv_multipart(zmq.NOBLOCK, copy=True))
            except zmq.Again:
                break
            size += len(messages[-1][-1])
            if size > RECV_BATCH_BYTES:
                break
        acks: dict[bytes, list[int]] = defaultdict(list)
        infos: dict[bytes, dict[int, dict[str, Any]]] = defaultdict(dict)
        unknown: dict[bytes, set[str]] = defaultdict(set)
        touched: set[Run] = set()
        # Frames applied this turn, acknowledged only once they are durable:
        # (identity, sender, seq, run, info, metrics store or None, its rollbacks then)
        applied: list[tuple[bytes, str, int, Run, Any, Any, int]] = []
        this_turn: set[tuple[str, int]] = set()
        failed: set[Run] = set()  # a write for this run failed this turn: its non-metrics frames wait
        for parts in messages:
            if len(parts) != 2:
                self._reject("bad-envelope", f"{len(parts)} message parts")
                continue
            identity, data = parts
            try:
                frame = proto.decode_frame(data, self.max_frame_bytes)
                check_envelope(frame)
            except ProtocolError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            self.counters["frames"] += 1
            self._last_frame_at = time.monotonic()
            if self.relay is not None:
                if not self.relay.forward(frame.sender, identity, data):
                    self.counters["relay-busy"] += 1
                continue
            if frame.seq is not None:
                self.windows[frame.sender].raise_floor(frame.low)
            if frame.seq is not None and self.windows[frame.sender].seen(frame.seq):
                self.counters["duplicates"] += 1
                acks[identity].append(frame.seq)  # the first ack may have been lost
                continue
            if frame.seq is not None:
                if (frame.sender, frame.seq) in this_turn:
                    self.counters["duplicates"] += 1  # a resend in the same batch: acked with the first
                    continue
                this_turn.add((frame.sender, frame.seq))
            try:
                info, run = self._apply(frame, data)
            except OSError as exc:  # a full disk: not stored, not acknowledged; the sender resends
                self._persist_failed(exc, frame.run)
                if frame.run in self.runs:
                    failed.add(self.runs[frame.run])
                continue
            except Deferred:  # an artifact chunk ahead of the one it follows: wait for the resend
                self.counters["deferred"] += 1
                continue
            except (ProtocolError, TypeError, ValueError, RecursionError) as exc:  # not OSError: a disk's fault, not the frame's
                reason, detail = (exc.reason, exc.detail) if isinstance(exc, ProtocolError) else ("bad-values", repr(exc))
                if not isinstance(exc, ProtocolError):
                    log.exception("frame %s of run %s could not be applied", frame.kind, frame.run)
                self._reject(reason, detail)
                if frame.seq is not None:  # tell the sender, so it stops resending and counts the loss
                    self.windows[frame.sender].add(frame.seq)
                    acks[identity].append(frame.seq)
                    infos[identity][frame.seq] = {"rejected": f"{reason}: {detail}"}
                continue
            if run is None:  # no hello for this run yet: not persisted, not acked; ask for a hello
                if frame.kind != proto.HEARTBEAT:
                    unknown[identity].add(frame.run)
                continue
            touched.add(run)
            if frame.seq is not None:
                store = run.store if frame.kind == proto.METRICS else None
                applied.append((identity, frame.sender, frame.seq, run, info, store,
                                store.rollbacks if store is not None else 0))
        for run in touched:
            try:
                run.sync()
            except OSError as exc:
                failed.add(run)
                self._persist_failed(exc, str(run.dir))
        try:
            self.artifacts.sync()
        except OSError as exc:
            self._persist_failed(exc, "artifacts")
            failed.update(touched)
        refused = 0
        for identity, sender, seq, run, info, store, rollbacks in applied:
            if (store.rollbacks != rollbacks) if store is not None else run in failed:
                refused += 1  # not durable: no ack, not marked seen, so the resend is stored
                continue
            self.windows[sender].add(seq)
            acks[identity].append(seq)
            if info:
                infos[identity][seq] = info
        if refused:
            self.counters["unpersisted"] += refused
        elif applied and self._failing_since is not None:
            log.warning("writing works again after %.0f s; %d frames were refused meanwhile (their senders resent them)",
                        time.monotonic() - self._failing_since, self._refused_while_failing)
            self._failing_since = None
        if refused:
            self._refused_while_failing += refused
        for identity in set(acks) | set(unknown):
            reply = proto.encode_ack(acks.get(identity, []), infos.get(identity), sorted(unknown.get(identity, ())))
            try:
                self._router.send_multipart([identity, reply], zmq.NOBLOCK)
            except zmq.Again:
                pass  # the sender resends and gets a fresh ack

    def _apply(self, frame: proto.Frame, data: bytes) -> tuple[dict[str, Any] | None, Run | None]:
        kind = frame.kind
        if kind == proto.HELLO:
            run = self.runs.get(frame.run)
            if run is None:
                run = self.runs[frame.run] = Run.from_hello(self.root, frame, self.name)
                log.info("run %s started in %s", frame.run, run.dir)
                for sender, ranges in (run.store.stored_frames if run.store else {}).items():
                    for lo, hi in ranges:  # stored before a crash or restart: a resend is a duplicate
                        self.windows[sender].add_range(lo, hi)
                parent = frame.body.get("parent")
                if parent:
                    self._link_child(str(parent), frame.run)
            run.hello(frame)
            self.hardware.hello(frame, run.dir)  # log_hardware=True: sample while the rank runs
            return {"run_dir": str(run.dir)}, run
        run = self.runs.get(frame.run)
        if run is None:
            self.counters["waiting-for-hello"] += 1
            return None, None
        if kind == proto.METRICS:
            table = frame_table(frame)
            run.metrics_store().add(data, table, frame.sender, frame.seq)
            self.counters["points"] += table.num_rows
        elif kind == proto.PARAMS:
            params = frame.body.get("params")
            if not isinstance(params, dict):
                raise ProtocolError("bad-shape", "params body must be a map")
            run.set_params(frame.rank, params)
        elif kind == proto.LOG:
            run.log_lines(frame)
        elif kind == proto.HEARTBEAT:
            run.heartbeat(frame)
        elif kind == proto.ARTIFACT:
            self.artifacts.apply(run, frame)
        elif kind == proto.CODE:
            self.artifacts.apply_code(run, frame)
        elif kind == proto.FINISH:
            # The ack waits for this rank's points to be in Parquet; merging the run's
            # parts into one happens right after, between turns, off the ack's path.
            run.sync()
            run.finish_rank(frame)
            run.flush_metrics()
            self.hardware.rank_ended(frame.run, frame.rank)  # one last sample, then stop
            log.info("run %s rank %d: %s", frame.run, frame.rank, frame.body.get("status"))
        run.rank_seen[frame.rank] = time.monotonic()
        return None, run

    def _link_child(self, parent_uid: str, child_uid: str) -> None:
        parent = self.runs.get(parent_uid)
        if parent is not None:
            parent.add_child(child_uid)
            return
        run_dir = find_run_dir(self.root, parent_uid)
        if run_dir is None:
            log.warning("run %s names parent %s, which is not under %s", child_uid, parent_uid, self.root)
            return
        info = read_yaml(run_dir / RUN_YAML)
        if child_uid not in info.setdefault("children", []):
            info["children"].append(child_uid)
            write_yaml_atomic(run_dir / RUN_YAML, info)

    def _persist_failed(self, exc: OSError, what: str) -> None:
        """A write failed (ENOSPC, EIO...): say why at once, then every 30 s while it lasts."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._refused_while_failing = 0
            self._failure_logged_at = now
            log.error("cannot write (%s: %s); not acknowledging what is not stored: senders keep "
                      "their frames (and spill them) until space returns", what, exc)
        elif now - self._failure_logged_at >= PERSIST_FAILURE_LOG_EVERY_S:
            self._failure_logged_at = now
            log.error("still cannot write for %.0f s (%s: %s); %d frames refused so far",
                      now - self._failing_since, what, exc, self._refused_while_failing)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejects[reason] += 1
        count = self.rejects[reason]
        if count <= 10 or count % 1000 == 0:
            log.warning("rejected frame (%s, %d so far): %s", reason, count, detail[:200])

    # --- between turns ------------------------------------------------------------------
    def _periodic(self, now: float) -> None:
        if self.relay is not None:
            self.relay.forget_idle(now)
        parent_gone = self.parent_pid is not None and not _alive(self.parent_pid)
        for uid, run in list(self.runs.items()):
            try:
                self._periodic_run(uid, run, now, parent_gone)
            except OSError as exc:  # a full disk: the rows stay in the WAL and memory; try again later
                self._persist_failed(exc, uid)
        self._periodic_rest(now, parent_gone)

    def _periodic_run(self, uid: str, run: Run, now: float, parent_gone: bool) -> None:
        store = run.store
        if store is not None and store.pending_rows and (
            store.pending_rows >= FLUSH_ROWS or now - run.flushed_at >= FLUSH_INTERVAL_S
        ):
            run.flushed_at = now  # first: a failing write (full disk) is retried at the next interval, not every tick
            run.flush_metrics(final=run.final_since is not None)
        elif store is not None and run.final_since is not None:
            run.flush_metrics(final=True)  # late frames after the end: fold them in
        lost = [r for r in run.running_ranks() if parent_gone or self._silent_too_long(run, r, now)]
        if lost:
            why = "the training process exited without finishing" if parent_gone else "no heartbeat"
            for rank in lost:
                log.warning("run %s rank %d: %s; marking it lost", uid, rank, why)
                run.end_rank(rank, "lost", time.time(), {"type": "Lost", "message": why})
                self.hardware.rank_ended(uid, rank)
            run.flush_metrics(final=run.final_since is not None)
        if run.owner and run.final_since is None and now - run.merged_at >= 1.0 and (run.dir / HOSTS_DIR).exists():
            run.merged_at = now
            run.merge_remote()  # other hosts' collectors share this run folder
        run.write_info()
        if run.final_since is not None and now - run.final_since > FORGET_FINISHED_AFTER_S:
            self.artifacts.close_run(uid, final=True)
            run.close()
            del self.runs[uid]

    def _periodic_rest(self, now: float, parent_gone: bool) -> None:
        if parent_gone:
            log.info("parent process %d is gone; exiting", self.parent_pid)
            self._stopping = True
        elif self.idle_exit is not None and now - self._last_frame_at > self.idle_exit and not any(
            run.running_ranks() for run in self.runs.values()
        ):
            log.info("no running run for %.0f s; exiting", self.idle_exit)
            self._stopping = True
        if self.on_periodic is not None:
            self.on_periodic(now)

    def _silent_too_long(self, run: Run, rank: int, now: float) -> bool:
        """Lost after two missed heartbeats (or --heartbeat-timeout, when given)."""
        limit = self.heartbeat_timeout or 2 * run.heartbeat_interval.get(rank, 5.0) + 1.0
        return now - run.rank_seen.get(rank, now) > limit

    def _shutdown(self) -> None:
        self.hardware.close()  # last samples of the runs still sampled, then its thread ends
        local = self.parent_pid is not None
        for uid, run in list(self.runs.items()):
            if local and run.running_ranks():
                for rank in run.running_ranks():
                    run.end_rank(rank, "lost", time.time(),
                                 {"type": "Crashed", "message": "the collector stopped before the rank finished"})
            try:
                self.artifacts.close_run(uid, final=run.final_since is not None)
                run.close()
            except Exception:
                log.exception("could not close run %s cleanly", uid)
        self.runs.clear()
        log.info("collector stopped: %s; rejected: %s", dict(self.counters), dict(self.rejects))
        if self.relay is not None:
            self.relay.close()
        self._router.close(1000)
        if self.zap is not None:
            self.zap.close()
        self._stop_pull.close(0)
        self._ctx.term()


def _alive(pid: int) -> bool:
    if os.getppid() != pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True
