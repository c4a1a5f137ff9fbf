"""The collector's receive loop: frames in, write-ahead log, acknowledgements out.

One thread. Each turn it takes every frame that is waiting (up to a batch), persists
them (WAL append, run.log, YAML), makes the batch durable with one group commit for all
the runs it touched, and only then acknowledges the sequence numbers to their senders.
Periodic work (Parquet flushes by size and age, run.yaml updates, missing heartbeats)
happens between turns, and only for runs that need it: the touched ones every tick,
all of them once a second (docs/architecture.md, Scaling).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import zmq

from expman._env import hostname
from expman._wire import frames as proto
from expman._wire.curve_keys import ClientKeys
from expman._errors import ProtocolError
from expman._storage.layout import HOSTS_DIR
from expman._wire.limits import check_envelope, check_name

from ._background import Background, give_back_memory
from ._commit import GroupCommit
from ._auth import ZAP_DOMAIN, CurvePolicy, CurveServer, ZapHandler
from ._hardware import HardwareMonitor
from ._artifacts import ArtifactService, ArtifactSettings, Deferred
from ._rank_watch import OpenConnections, ProcessWatch
from ._relay import Relay
from ._ring_drain import RingDrain
from ._write_failures import WriteFailures
from ._delivery import Applied, Senders, SeqWindow, Turn, Windows  # noqa: F401  (SeqWindow: tests import it here)
from ._runs import Run, add_child_on_disk

if TYPE_CHECKING:
    from ._bucket import BucketMirror

log = logging.getLogger("expman.collector")

RECV_BATCH = 2048  # frames per turn: bounds the rows decoded before the next commit
COMMIT_INTERVAL_S = 0.01  # after a turn of small frames, the next at most this often: frames gather meanwhile
PACE_BELOW_BYTES = 1 << 20  # a turn that took this much data or more is followed at once
RECV_HWM = 10000  # frames ZeroMQ takes in per sender ahead of the loop: a frame a rank sent is out of its
# process at once, so a kill -9 of the rank right after cannot lose it (tests/rank/test_kill_drain.py)
RECV_BATCH_BYTES = 8 * 1024 * 1024  # bounds a turn's memory (artifact chunks are up to 1 MiB) and its time:
# a frame of 16,384 new keys takes ~5 ms to take in, and every ack of the turn waits for the last
# A run's rows become a Parquet part once the oldest waited FLUSH_AGE_S (live readers tail the
# WAL; a run of a few minutes makes one part, at its finish, and no merge), or once FLUSH_ROWS
# or FLUSH_FRAMES wait, or, largest runs first, while all runs' waiting rows pass PENDING_ROWS.
# In a bucket readers see only parts: there the age is FLUSH_AGE_BUCKET_S.
FLUSH_AGE_S = 120.0
FLUSH_AGE_BUCKET_S = 5.0
FLUSH_ROWS = 262_144
FLUSH_FRAMES = 65_536  # committed small frames are packed (~24 bytes each, collector/_metrics_store.py)
PENDING_ROWS = 4_000_000  # ~100 MB of packed rows across all runs
# Freed memory goes back to the OS (malloc_trim: ~10-40 ms) after this much input, at a sweep
# with nothing waiting, and at the first sweep after new runs stop coming: a burst (a thousand
# runs' hellos at once) leaves ZeroMQ's I/O thread's malloc arena at its peak.
TRIM_AFTER_BYTES = 16 << 20
TICK_S = 0.1  # runs touched since the last tick are looked at this often
SWEEP_S = 1.0  # every run (ages, heartbeats, run.yaml, forgetting) this often
FORGET_FINISHED_AFTER_S = 600.0  # a finished run stays open this long for late frames, then is closed
FORGET_UPLOADED_AFTER_S = 60.0  # ... with a bucket root (then its staging folder goes once all of it is up)
IDLE_GRACE_S = 3.0
# Local mode, after a watched process exited: its frames are all in once no connection is
# open and no frame waits (the parent of a private collector), else once none of it came for
# DRAIN_QUIET_S (ZeroMQ's I/O thread moves what the kernel holds within milliseconds); frames
# that keep coming from another process end a drain after DRAIN_MAX_S.
DRAIN_QUIET_S = 0.3
DRAIN_MAX_S = 10.0
DRAIN_BUSY_S = 1.0
GONE_WHY = "the training process exited without finishing"
SWITCH_INTERVAL_S = 0.0005
STOP_MERGES_AFTER_S = 4.0  # at exit, merges still running after this give up (parts are written whatever):
# a local collector is killed 10 s after SIGTERM (expman/_rank/local_collector.py)
_DELIVERY_KINDS = frozenset({proto.HELLO, proto.PARAMS, proto.LOG, proto.FINISH, proto.CODE})  # recorded per run


def over_budget(waiting: dict[str, int], budget: int) -> list[str]:
    """The runs whose waiting rows become parts now: none while all of them stay within
    `budget`, else the largest first until half of it is left (so this is not every sweep)."""
    total = sum(waiting.values())
    if total <= budget:
        return []
    chosen = []
    for uid in sorted(waiting, key=waiting.__getitem__, reverse=True):
        if total <= budget // 2:
            break
        chosen.append(uid)
        total -= waiting[uid]
    return chosen


class _Written(threading.Event):
    """Set by the background once a finishing rank's points are in a part; wakes the loop."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake()


class Collector:
    def __init__(
        self,
        root: Path,
        binds: list[str],
        *,
        parent_pid: int | None = None,
        watch_ranks: bool = False,
        heartbeat_timeout: float | None = None,
        max_frame_bytes: int = proto.MAX_FRAME_BYTES,
        idle_exit: float | None = None,
        forward: str | None = None,
        name: str | None = None,
        hardware_interval: float = 1.0,
        artifacts: ArtifactSettings | None = None,
        curve: CurveServer | None = None,
        forward_keys: ClientKeys | None = None,
        forget_after: float = FORGET_FINISHED_AFTER_S,
        part_age: float | None = None,
    ) -> None:
        self.root = root
        self.forget_after = forget_after
        self.part_age = part_age  # None: FLUSH_AGE_S, or FLUSH_AGE_BUCKET_S with a bucket root
        # A bucket root (attach_mirror): runs closed here whose staging folder goes once they are
        # all in the bucket (run id -> folder), and those already gone (run id -> bucket location).
        self.mirror: BucketMirror | None = None
        self._releasing: dict[str, Path] = {}
        self._released: dict[str, str] = {}
        self.name = check_name("collector", name or socket.gethostname())  # the writer of its parts
        self.hardware = HardwareMonitor(root, interval=hardware_interval, writer=self.name,  # samples on its own thread
                                        local_only=all(b.startswith("ipc://") for b in binds))
        self.parent_pid = parent_pid
        self.watch = ProcessWatch(parent_pid)
        self.watch_ranks = watch_ranks or parent_pid is not None  # local mode: each rank's pid is on this host
        self._parent_gone_at: float | None = None
        self._gone_at: dict[tuple[str, int, int], float] = {}  # (run, rank, pid) -> when its process was seen gone
        self.idle_exit = idle_exit  # exit after this long with no running rank and no frame
        # A fresh collector waits at least IDLE_GRACE_S for its first frame: a rank that was
        # reconnecting to its predecessor needs a moment to find it.
        self._last_frame_at = time.monotonic() + max(0.0, IDLE_GRACE_S - (idle_exit or 0.0))
        self.heartbeat_timeout = heartbeat_timeout
        self.max_frame_bytes = max_frame_bytes
        self.runs: dict[str, Run] = {}
        self.artifacts = ArtifactService(artifacts)
        self.senders = Senders()
        self.rings = RingDrain(self.senders.seen)  # dead ranks' points in shared memory (this host)
        self.rings.clean_stale()
        self.counters: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 1000)
        self._router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + 1024)
        self._router.setsockopt(zmq.RCVHWM, RECV_HWM)
        self.zap: ZapHandler | None = None
        # Local mode: who is connected, watched from before the first connection can arrive
        # (the ZAP handler owns the monitor where CURVE is on; local collectors are ipc only).
        self.connections = OpenConnections(self._router) if self.watch_ranks and curve is None else None
        self.endpoints = self._bind_all(binds, curve)
        self._stop_pull = self._ctx.socket(zmq.PULL)
        self._stop_addr = f"inproc://collector-stop-{id(self)}"
        self._stop_pull.bind(self._stop_addr)
        self._wake_pull = self._ctx.socket(zmq.PULL)  # the background says a held finish may be answered
        self._wake_addr = f"inproc://collector-wake-{id(self)}"
        self._wake_pull.bind(self._wake_addr)
        self._stopping = False
        self.write_failures = WriteFailures()
        self._poller = zmq.Poller()
        self.relay = Relay(self._ctx, forward, self._poller, forward_keys) if forward else None
        # Called with the loop's monotonic time after each round of periodic work (the
        # daemon's sd_notify watchdog and status); must be quick and must not raise.
        self.on_periodic: Callable[[float], None] | None = None
        self._touched: set[Run] = set()  # runs that took a frame since the last tick
        self._next_sweep = 0.0
        self.background = Background(on_error=self._background_failed)  # parts and merges, beside this loop
        # The loop gives up the GIL at every socket call and write; with a background thread
        # busy, taking it back waits out the switch interval (5 ms by default) each time.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.commit = GroupCommit(root, self.background.active)
        # A finish is answered once its rank's points are in a part: (sender, seq) -> set then.
        self._finish_written: dict[tuple[str, int], threading.Event] = {}
        self._held: dict[tuple[str, int], tuple[threading.Event, bytes, dict[str, Any] | None]] = {}
        self._last_turn = 0.0
        self._last_turn_bytes = 0
        self._bytes_since_trim = 0
        self._new_runs = 0  # since the last trim
        self._new_runs_seen = 0  # ... as the last sweep saw them

    def attach_mirror(self, mirror: BucketMirror) -> None:
        """A bucket root: runs this collector closes leave the staging folder once all of them
        is in the bucket; late frames of runs already gone are answered from their tombstones
        (a known (sender, seq) as a duplicate, anything else refused), never stored."""
        self.mirror = mirror
        for record in mirror.released():
            self._forget_released(record)
        self._releasing.update(mirror.ended())  # closed by a collector before this one

    def _forget_released(self, record: dict[str, Any]) -> None:
        self._released[record["id"]] = str(record.get("location"))
        try:
            windows = {str(s): (int(floor), [[int(lo), int(hi)] for lo, hi in ranges])
                       for s, (floor, ranges) in (record.get("windows") or {}).items()}
        except (TypeError, ValueError, AttributeError):  # a damaged tombstone: resends are refused, not acked
            return
        self.senders.seed({}, windows)

    def _release_uploaded(self) -> None:
        """Closed runs all in the bucket: their staging folders go (the mirror checks, removes)."""
        assert self.mirror is not None
        for uid, run_dir in list(self._releasing.items()):
            try:
                record = self.mirror.release(run_dir)
            except Exception as exc:  # an unreadable run.yaml, a folder that will not go: it stays staged
                del self._releasing[uid]
                log.warning("run %s: its staging folder %s stays (%s)", uid, run_dir, exc)
                continue
            if record is not None:
                del self._releasing[uid]
                self._forget_released(record)

    def _uploaded_refusal(self, uid: str) -> ProtocolError:
        return ProtocolError("run-uploaded", f"run {uid} is finished and uploaded to {self._released[uid]}; its "
                                             "staging copy is gone, so this collector stores nothing more for it")

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
        poller.register(self._wake_pull, zmq.POLLIN)
        zap_sockets = self.zap.sockets() if self.zap is not None else []
        for sock in zap_sockets:
            poller.register(sock, zmq.POLLIN)
        next_periodic = 0.0
        try:
            while not self._stopping:
                events = dict(poller.poll(100))
                if self._stop_pull in events:
                    break
                try:
                    self._serve_events(events, zap_sockets)
                except zmq.ContextTerminated:
                    raise
                except Exception:  # no input, and no bug it reaches, ends the process
                    self._internal_error("in the receive loop")
                now = time.monotonic()
                if now >= next_periodic:
                    next_periodic = now + TICK_S
                    self._periodic(now)
        finally:
            self._shutdown()

    def _serve_events(self, events: dict[Any, int], zap_sockets: list[Any]) -> None:
        if self.zap is not None and any(sock in events for sock in zap_sockets):
            self.zap.handle()
        if self._wake_pull in events:
            while True:
                try:
                    self._wake_pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
            self._answer_held()
        if self._router in events:
            self._turn()
        if self.relay is not None:
            for sock in self.relay.sockets():
                if sock in events:
                    self.relay.pass_back(sock, self._router)

    def _turn(self) -> None:
        """Take what waits, make it durable with one commit, answer. After a turn of small
        frames the next comes at most COMMIT_INTERVAL_S later: many small runs then share one
        commit, so its cost per point falls as they grow in number (an ack waits at most that
        much longer). After a turn with bulk data (PACE_BELOW_BYTES) there is no wait: big
        frames already amortize their commit, and waiting would only queue them in memory."""
        if self._last_turn_bytes < PACE_BELOW_BYTES:
            wait = self._last_turn + COMMIT_INTERVAL_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self._last_turn = time.monotonic()
        turn = Turn()
        messages = self._receive()
        self._last_turn_bytes = sum(len(parts[-1]) for parts in messages)
        self._bytes_since_trim += self._last_turn_bytes
        for parts in messages:
            try:
                self._take(parts, turn)
            except Exception:  # a bug met this frame: it costs the frame, never the loop
                self._internal_error("while taking a frame")
        self._make_durable(turn)
        self._release_held(turn)
        self._answer(turn)

    def _answer_held(self) -> None:
        if self._held:
            turn = Turn()
            self._release_held(turn)
            self._answer(turn)

    def _wake(self) -> None:
        """From a background thread: a held finish may be answered (a socket of its own: ZeroMQ
        sockets stay with one thread)."""
        try:
            sock = self._ctx.socket(zmq.PUSH)
            sock.connect(self._wake_addr)
            sock.send(b"")
            sock.close(1000)
        except zmq.ZMQError:
            pass  # stopping: the loop answers nothing more

    def _release_held(self, turn: Turn) -> None:
        """Answer the finishes whose rank's points are now in a part."""
        for key, (written, identity, info) in list(self._held.items()):
            if written.is_set():
                del self._held[key]
                turn.acks[identity].append(key[1])
                if info:
                    turn.infos[identity][key[1]] = info

    def _receive(self) -> list[list[bytes]]:
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
        return messages

    def _take(self, parts: list[bytes], turn: Turn) -> None:
        """Check one message and apply it; every frame with a usable seq gets an answer."""
        if len(parts) != 2:
            self._reject("bad-envelope", f"{len(parts)} message parts")
            return
        identity, data = parts
        try:
            frame = proto.decode_frame(data, self.max_frame_bytes)
        except ProtocolError as exc:
            self._refuse(turn, identity, getattr(exc, "seq", None), exc)
            return
        try:
            check_envelope(frame)
        except ProtocolError as exc:
            self._refuse(turn, identity, frame.seq, exc)
            return
        self.counters["frames"] += 1
        self._last_frame_at = time.monotonic()
        if self.relay is not None:
            if not self.relay.forward(frame.sender, identity, data):
                self.counters["relay-busy"] += 1
            return
        if frame.seq is not None:
            if self.senders.is_duplicate(frame):
                self.counters["duplicates"] += 1
                if (frame.sender, frame.seq) not in self._held:  # a held finish is answered when its part is written
                    turn.acks[identity].append(frame.seq)  # the first ack may have been lost
                return
            if (frame.sender, frame.seq) in turn.this_turn:
                self.counters["duplicates"] += 1  # a resend in the same batch: acked with the first
                return
            turn.this_turn.add((frame.sender, frame.seq))
        self._apply_guarded(identity, frame, data, turn)

    def _apply_guarded(self, identity: bytes, frame: proto.Frame, data: bytes, turn: Turn) -> None:
        try:
            info, run = self._apply(frame, data)
        except OSError as exc:  # a full disk: not stored, not acknowledged; the sender resends
            self.write_failures.failed(exc, frame.run)
            if frame.run in self.runs:
                turn.failed.add(self.runs[frame.run])
            turn.this_turn.discard((frame.sender, frame.seq))  # not taken: a copy later in the turn may be
            return
        except Deferred:  # an artifact chunk ahead of the one it follows: wait for the resend
            self.counters["deferred"] += 1
            turn.this_turn.discard((frame.sender, frame.seq))
            return
        except Exception as exc:
            if isinstance(exc, ProtocolError):
                reason, detail = exc.reason, exc.detail
                self._reject(reason, f"run {frame.run} rank {frame.rank} {frame.kind}: {detail}")
            else:  # a bug, not the frame's fault as far as we know: say where, count it, go on
                reason, detail = "internal-error", repr(exc)
                self._internal_error(f"applying a {frame.kind} frame of run {frame.run} from sender "
                                     f"{frame.sender[:16]} (rank {frame.rank})")
            if frame.seq is not None:  # tell the sender, so it stops resending and counts the loss
                self.senders.mark(frame.sender, frame.seq)
                turn.refuse(identity, frame.seq, f"{reason}: {detail}")
            return
        if run is None:  # no hello for this run yet: not persisted, not acked; ask for a hello
            if frame.kind != proto.HEARTBEAT or frame.seq is not None:  # a rank's heartbeats carry no seq
                turn.unknown[identity].add(frame.run)
            # not taken: a copy sent behind the run's hello, later in this turn, is (not a duplicate)
            turn.this_turn.discard((frame.sender, frame.seq))
            return
        turn.touched.add(run)
        if frame.seq is not None:
            store = run.store if frame.kind == proto.METRICS else None
            turn.applied.append(Applied(identity, frame.sender, frame.seq, run, info, store,
                                         store.rollbacks if store is not None else 0))

    def _store_made(self, frames: list[bytes]) -> None:
        """Frames made here (a dead rank's ring): the checks, WAL and duplicate rules of received ones, no ack."""
        turn = Turn()
        for data in frames:
            self._take([b"", data], turn)
        self._make_durable(turn)

    def _refuse(self, turn: Turn, identity: bytes, seq: int | None, exc: ProtocolError) -> None:
        """A frame refused before it reached a run: counted, logged, and answered when it had a seq."""
        self._reject(exc.reason, exc.detail)
        if seq is not None:
            turn.refuse(identity, seq, f"{exc.reason}: {exc.detail}")

    def _make_durable(self, turn: Turn) -> None:
        """Make every touched run durable at once (one group commit), record what was
        applied, then mark the frames seen."""
        self._touched |= turn.touched
        for run, exc in self.commit.sync(turn.touched):
            turn.failed.add(run)
            self.write_failures.failed(exc, str(run.dir))
        try:
            self.artifacts.sync()
        except OSError as exc:
            self.write_failures.failed(exc, "artifacts")
            turn.failed.update(turn.touched)
        durable = [a for a in turn.applied
                   if ((a.store.rollbacks == a.rollbacks) if a.store is not None else a.run not in turn.failed)]
        refused = len(turn.applied) - len(durable)  # not durable: no ack, not marked seen, so the resend is stored
        unrecorded = self._save_deliveries(turn.touched - turn.failed, durable)
        for a in durable:
            if a.store is None and a.run in unrecorded:
                refused += 1
                continue
            self.senders.mark(a.sender, a.seq)
            written = self._finish_written.pop((a.sender, a.seq), None)
            if written is not None and not written.is_set():
                self._held[(a.sender, a.seq)] = (written, a.identity, a.info)
                continue
            turn.acks[a.identity].append(a.seq)
            if a.info:
                turn.infos[a.identity][a.seq] = a.info
        self._finish_written.clear()
        if refused:
            self.counters["unpersisted"] += refused
        self.write_failures.turn_done(len(turn.applied), refused)

    def _save_deliveries(self, runs: set[Run], durable: list[Applied]) -> set[Run]:
        """Each run that applied params, log lines, hello or finish records so (with this
        turn's seqs) before the acks go out; returns the runs whose record failed."""
        failed = set()
        seqs: dict[str, list[int]] = defaultdict(list)
        for a in durable:
            seqs[a.sender].append(a.seq)
        made: Windows = {}
        for run in runs:
            if run.delivery_dirty:
                try:
                    run.save_delivery(self.senders.snapshot(run.senders, seqs, made))
                except OSError as exc:
                    failed.add(run)
                    self.write_failures.failed(exc, str(run.dir))
        return failed

    def _answer(self, turn: Turn) -> None:
        for identity in set(turn.acks) | set(turn.unknown):
            reply = proto.encode_ack(turn.acks.get(identity, []), turn.infos.get(identity),
                                     sorted(turn.unknown.get(identity, ())))
            try:
                self._router.send_multipart([identity, reply], zmq.NOBLOCK)
            except zmq.Again:
                pass  # the sender resends and gets a fresh ack

    def _apply(self, frame: proto.Frame, data: bytes) -> tuple[dict[str, Any] | None, Run | None]:
        """Apply one checked frame to its run; returns (facts for the ack, the run or None)."""
        kind = frame.kind
        if kind == proto.HELLO:
            return self._hello(frame)
        run = self.runs.get(frame.run)
        if run is None:
            if frame.run in self._released:
                raise self._uploaded_refusal(frame.run)
            self.counters["waiting-for-hello"] += 1
            return None, None
        if frame.rank >= run.info["world_size"]:
            raise ProtocolError("bad-values", f"rank {frame.rank} is outside [0, {run.info['world_size']}) of run {frame.run}")
        run.senders.add(frame.sender)
        if frame.seq is not None and kind in _DELIVERY_KINDS:
            run.delivery_dirty = True
        if kind == proto.METRICS:
            rows, last = run.metrics_store().add_frame(data, frame)
            self.counters["points"] += rows
            if last is not None:
                run.stored_step(frame.rank, last)
        elif kind == proto.PARAMS:
            run.set_params(frame.rank, frame.body["params"])
        elif kind == proto.LOG:
            run.log_lines(frame)
        elif kind == proto.HEARTBEAT:
            run.heartbeat(frame)
        elif kind == proto.ARTIFACT:
            self.artifacts.apply(run, frame)
        elif kind == proto.CODE:
            self.artifacts.apply_code(run, frame)
        elif kind == proto.FINISH:
            # The rank's points are made durable (WAL) before the ack; their part is
            # written, and the run's parts merged into one, in the background.
            if run.store is not None:
                run.store.sync()
            run.finish_rank(frame)
            written = _Written(self._wake)
            run.flush_metrics(written=written)
            if frame.seq is not None:
                self._finish_written[(frame.sender, frame.seq)] = written
            self.hardware.rank_ended(frame.run, frame.rank)  # one last sample, then stop
            log.info("run %s rank %d: %s", frame.run, frame.rank, frame.body.get("status"))
        run.rank_seen[frame.rank] = time.monotonic()
        return None, run

    def _hello(self, frame: proto.Frame) -> tuple[dict[str, Any], Run]:
        run = self.runs.get(frame.run)
        if run is None:
            if frame.run in self._released:  # reopening it would overwrite the bucket's run with an empty one
                raise self._uploaded_refusal(frame.run)
            self._releasing.pop(frame.run, None)  # closed, still staged: reopened (released when closed again)
            run = self.runs[frame.run] = Run.from_hello(self.root, frame, self.name, self.background)
            self._new_runs += 1
            if self.mirror is not None:  # a bucket root: collector/_bucket.py uploads the hosts file
                run.shares_hosts = True
                run.touch(force=True)
            log.info("run %s started in %s", frame.run, run.dir)
            self.senders.seed(run.store.stored_frames if run.store else {}, run.delivered)
            parent = frame.body.get("parent")
            if parent:
                self._link_child(str(parent), frame.run)
        run.senders.add(frame.sender)
        if frame.seq is not None and self.senders.seen(frame.sender, frame.seq):
            self.counters["duplicates"] += 1  # applied before a restart; answer with the folder again
            return {"run_dir": str(run.dir)}, run
        if frame.seq is not None:
            run.delivery_dirty = True
        run.hello(frame)
        self.hardware.hello(frame, run.dir)  # log_hardware=True: sample while the rank runs
        run.rank_seen[frame.rank] = time.monotonic()
        return {"run_dir": str(run.dir)}, run

    def _link_child(self, parent_uid: str, child_uid: str) -> None:
        parent = self.runs.get(parent_uid)
        if parent is not None:
            parent.add_child(child_uid)
            self._touched.add(parent)  # its run.yaml goes with the next tick's commit
            return
        add_child_on_disk(self.root, parent_uid, child_uid)

    def _internal_error(self, where: str) -> None:
        """Call from an except block: a bug met some input. Logged with its traceback (the
        first ten, then every thousandth), counted as `internal-error`; the loop goes on."""
        self.rejects["internal-error"] += 1
        count = self.rejects["internal-error"]
        if count <= 10 or count % 1000 == 0:
            log.exception("internal error %s (%d so far); carrying on", where, count)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejects[reason] += 1
        count = self.rejects[reason]
        if count <= 10 or count % 1000 == 0:
            log.warning("rejected frame (%s, %d so far): %s", reason, count, detail[:200])

    # --- between turns ------------------------------------------------------------------
    def _periodic(self, now: float) -> None:
        """Between turns: the runs touched since the last tick, and every SWEEP_S all runs.
        An idle run costs one cheap look per sweep, nothing per tick."""
        if self.relay is not None:
            self.relay.forget_idle(now)
        self.background.retry_due(now)
        self._answer_held()
        if self.connections is not None:
            self.connections.count()  # keep the monitor's queue short (it drops news past its HWM)
        parent_gone = self._parent_drained(now)
        vanished = self._vanished_ranks(now) if self.watch_ranks and not parent_gone else set()
        sweep = parent_gone or bool(vanished) or now >= self._next_sweep
        if sweep:
            self._next_sweep = now + SWEEP_S
            visit = list(self.runs.items())
        else:
            visit = [(uid, run) for run in self._touched if self.runs.get(uid := run.info["id"]) is run]
        self._touched = set()
        # Frames still waiting (a loop behind its load) may hold the heartbeats a silent
        # rank sent: nobody is judged silent until they are read.
        backlog = bool(self._router.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        due: set[Run] = set()  # runs whose run.yaml is to be written: all in one commit
        for uid, run in visit:
            try:
                self._periodic_run(uid, run, now, parent_gone, vanished, sweep, backlog)
                if uid in self.runs and run.info_due(now):
                    due.add(run)
            except OSError as exc:  # a full disk: the rows stay in the WAL and memory; try again later
                self.write_failures.failed(exc, uid)
            except Exception:
                self._internal_error(f"in the periodic work of run {uid}")
        for run, exc in self.commit.sync(due):
            self.write_failures.failed(exc, str(run.dir))
        if sweep:
            self._flush_largest(now)
            quiet = self._new_runs == self._new_runs_seen  # no new run since the last sweep
            if (self._bytes_since_trim >= TRIM_AFTER_BYTES and not backlog) or (quiet and self._new_runs):
                self._bytes_since_trim = self._new_runs = 0
                give_back_memory()
            self._new_runs_seen = self._new_runs
        try:
            if sweep and self._releasing:
                self._release_uploaded()
            self._periodic_rest(now, parent_gone)
        except Exception:
            self._internal_error("in the periodic work")

    def _flush_largest(self, now: float) -> None:
        """While the rows waiting in all runs pass PENDING_ROWS, the largest become parts."""
        waiting = {uid: run.store.pending_rows for uid, run in self.runs.items() if run.store is not None}
        for uid in over_budget(waiting, PENDING_ROWS):
            run = self.runs[uid]
            run.flushed_at = now
            run.flush_metrics(final=run.final_since is not None)

    def _periodic_run(self, uid: str, run: Run, now: float, parent_gone: bool, vanished: set[tuple[str, int]],
                      sweep: bool, backlog: bool) -> None:
        store = run.store
        age = self.part_age or (FLUSH_AGE_BUCKET_S if self.mirror is not None else FLUSH_AGE_S)
        if store is not None and store.pending_rows and (
            store.pending_rows >= FLUSH_ROWS or store.pending_frames >= FLUSH_FRAMES
            or (now - store.pending_since >= age and now - run.flushed_at >= age)
        ):
            run.flushed_at = now  # first: a failing write (full disk) is retried after the age, not every tick
            run.flush_metrics(final=run.final_since is not None)
        elif store is not None and run.final_since is not None:
            run.flush_metrics(final=True)  # late frames after the end: fold them in
        if not sweep:
            return
        gone = {r for r in run.running_ranks() if parent_gone or (uid, r) in vanished}
        lost = [r for r in run.running_ranks() if r in gone or (not backlog and self._silent_too_long(run, r, now))]
        if lost:
            for rank in lost:
                self.rings.recover(uid, rank, run.senders, self._store_made)  # before it is marked lost
                why = GONE_WHY if rank in gone else "no heartbeat"
                log.warning("run %s rank %d: %s; marking it lost", uid, rank, why)
                run.end_rank(rank, "lost", time.time(), {"type": "Lost", "message": why})
                self.hardware.rank_ended(uid, rank)
            run.flush_metrics(final=run.final_since is not None)
        if run.owner and run.final_since is None and now - run.merged_at >= 1.0 and (run.dir / HOSTS_DIR).exists():
            run.merged_at = now
            run.merge_remote()  # other hosts' collectors share this run folder
        if run.final_since is not None and now - run.final_since > self.forget_after:
            self.artifacts.close_run(uid, final=True)
            run.save_delivery(self.senders.snapshot(run.senders))
            run.close()
            del self.runs[uid]
            if self.mirror is not None:
                self._releasing[uid] = run.dir

    def _periodic_rest(self, now: float, parent_gone: bool) -> None:
        if parent_gone:
            log.info("parent process %d is gone and what it sent is stored; exiting", self.parent_pid)
            self._stopping = True
        elif self.idle_exit is not None and now - self._last_frame_at > self.idle_exit and not any(
            run.running_ranks() for run in self.runs.values()
        ):
            log.info("no running run for %.0f s; exiting", self.idle_exit)
            self._stopping = True
        if self.on_periodic is not None:
            self.on_periodic(now)

    def _settle_runs(self) -> None:
        """At exit: every run's pending rows handed over, then waited for; merges still
        running after STOP_MERGES_AFTER_S give up (their inputs stay, readers merge them),
        so parts are always written and no WAL is left, within the exit timeout."""
        deadline = time.monotonic() + STOP_MERGES_AFTER_S
        for uid, run in self.runs.items():
            try:
                run.sync()
                run.flush_metrics(final=run.final_since is not None)
            except Exception:
                log.exception("could not flush run %s", uid)
        for uid, run in self.runs.items():
            if not run.settle(max(0.0, deadline - time.monotonic())):
                if not self.background.stopping.is_set():
                    log.warning("stopping: merges still running after %.0f s are left for later", STOP_MERGES_AFTER_S)
                self.background.stopping.set()
                run.settle()

    def _background_failed(self, owner: Any, exc: BaseException) -> None:
        """A background write failed (it is tried again): said like any failing write."""
        store = owner[0] if isinstance(owner, tuple) else owner  # (a run's metrics store, its queue)
        where = str(getattr(store, "metrics_dir", store))
        if isinstance(exc, OSError):
            self.write_failures.failed(exc, where)
        else:
            self.rejects["internal-error"] += 1
            log.error("internal error writing parts of %s: %r; trying again later", where, exc, exc_info=exc)

    def _parent_drained(self, now: float) -> bool:
        """Local mode: True once the parent has exited and everything it had sent is stored.

        Seen gone (zombie or reaped), the parent can send nothing more, but frames it sent
        may still wait in the kernel and in the socket: the loop keeps taking them in until
        no connection is open and no frame waits (or, while another process stays connected,
        none came for DRAIN_QUIET_S). Only then are its ranks marked lost."""
        if self.parent_pid is None:
            return False
        if self._parent_gone_at is None:
            if not self.watch.parent_gone():
                return False
            self._parent_gone_at = now
            log.info("parent process %d is gone; storing what it sent before exiting", self.parent_pid)
        if now - self._parent_gone_at >= DRAIN_MAX_S:
            log.warning("frames kept coming for %.0f s after parent process %d exited; stopping", DRAIN_MAX_S,
                        self.parent_pid)
            return True
        if self._input_waiting():
            return False
        if self.connections is not None and self.connections.count() == 0:
            return True  # every connection read to its end, every frame of it taken: nothing more can come
        return self._drained(self._parent_gone_at, self._last_frame_at, now)

    def _vanished_ranks(self, now: float) -> set[tuple[str, int]]:
        """(run, rank) of this host's running ranks whose process has exited and whose frames
        have all been taken in: none for DRAIN_QUIET_S since the exit was seen, and no frame
        waiting in the socket (other ranks may keep it busy: after DRAIN_BUSY_S, quiet will do)."""
        here = hostname()
        vanished: set[tuple[str, int]] = set()
        watched: set[tuple[str, int, int]] = set()
        for uid, run in self.runs.items():
            for r in run.running_ranks():
                rank = run.info["ranks"][r]
                pid = rank.get("pid")
                if (r not in run.local_ranks or rank.get("host") != here or not isinstance(pid, int) or pid <= 0
                        or pid == self.parent_pid):  # the parent's ranks end with its drain (_parent_drained)
                    continue
                key = (uid, r, pid)
                watched.add(key)
                if key not in self._gone_at:
                    if not self.watch.gone(pid):
                        continue
                    self._gone_at[key] = now
                    log.info("run %s rank %d: process %d is gone; storing what it sent", uid, r, pid)
                if self._drained(self._gone_at[key], run.rank_seen.get(r, 0.0), now) and (
                        now - self._gone_at[key] >= DRAIN_BUSY_S or not self._input_waiting()):
                    vanished.add((uid, r))
        for key in set(self._gone_at) - watched:
            del self._gone_at[key]
        for pid in self.watch.watched() - {pid for _, _, pid in watched} - {self.parent_pid}:
            self.watch.forget(pid)
        return vanished

    def _drained(self, gone_at: float, last_frame_at: float, now: float) -> bool:
        if now - gone_at >= DRAIN_MAX_S:
            return True  # frames keep coming (another process on the socket): stop waiting for quiet
        return now - max(gone_at, last_frame_at) >= DRAIN_QUIET_S

    def _input_waiting(self) -> bool:
        """A frame waits in the ROUTER now (reading EVENTS also takes in the I/O thread's news)."""
        return bool(self._router.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def _silent_too_long(self, run: Run, rank: int, now: float) -> bool:
        """Lost after two missed heartbeats (or --heartbeat-timeout, when given)."""
        limit = self.heartbeat_timeout or 2 * run.heartbeat_interval.get(rank, 5.0) + 1.0
        return now - run.rank_seen.get(rank, now) > limit

    def _shutdown(self) -> None:
        self.watch.close()
        if self.connections is not None:
            self.connections.close()
        self.hardware.close()  # last samples of the runs still sampled, then its thread ends
        local = self.parent_pid is not None
        for uid, run in list(self.runs.items()):
            if local and run.running_ranks():
                for rank in run.running_ranks():
                    run.end_rank(rank, "lost", time.time(),
                                 {"type": "Crashed", "message": "the collector stopped before the rank finished"})
        self._settle_runs()
        for uid, run in list(self.runs.items()):
            try:
                self.artifacts.close_run(uid, final=run.final_since is not None)
                run.save_delivery(self.senders.snapshot(run.senders))
                run.close()
            except Exception:
                log.exception("could not close run %s cleanly", uid)
        self.runs.clear()
        self.counters["low-ignored"] = self.senders.ignored_floors
        log.info("collector stopped: %s; rejected: %s", dict(self.counters), dict(self.rejects))
        if self.relay is not None:
            self.relay.close()
        self._router.close(1000)
        if self.zap is not None:
            self.zap.close()
        self._stop_pull.close(0)
        self._wake_pull.close(0)
        self.commit.close()
        self.background.close()
        self._ctx.term()

