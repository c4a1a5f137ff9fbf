"""`expman sync`: deliver what senders left in their spool files, to a collector.

Each spool file (format: expman/_rank/spool.py) is replayed with the same delivery rule
as a live sender (expman/_wire/delivery.py) and the same socket setup
(expman/_rank/dealer.py), then deleted once every frame is acknowledged.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import zmq

from expman._env import COLLECTOR_ENV
from expman._rank.dealer import connect, read_acks, send_due
from expman._rank.local_collector import LocalCollector
from expman._rank.spool import SUFFIX, SpoolFile
from expman._wire import frames as proto
from expman._wire.curve_keys import client_keys
from expman._wire.delivery import RESEND_AFTER_S, Entry, Outbox

log = logging.getLogger("expman")


def replay(spool: SpoolFile, endpoint: str, timeout: float = 60.0, window: int = 256,
           resend_after: float = RESEND_AFTER_S) -> bool:
    """Send a spool file's frames, in order, to a collector; True once all are acknowledged.

    Runs are introduced first with their hello, from a socket and sender id of the
    replayer's own (the original hello's sequence number may lie below what the collector
    has already seen from that sender); a collector that answers `unknown_runs` later
    (it restarted) gets them again. Frames go out exactly as spooled, a window at a time,
    on a second socket, so acks (which carry sequence numbers only) are never ambiguous.
    Both sockets follow the same delivery rule as a live sender (expman/_wire/delivery.py).
    One loop with its two sockets and two outboxes in view, so the order (introductions
    before frames, re-introductions after a restart) reads in one place.
    """
    ctx = zmq.Context.instance()
    curve = client_keys()
    intro_sock, data_sock = connect(ctx, endpoint, curve), connect(ctx, endpoint, curve)
    me = f"sync-{uuid.uuid4().hex}"
    intros, frames = Outbox(resend_after), Outbox(resend_after)
    intro_seqs = itertools.count()
    todo = deque(spool.frames)
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    poller.register(intro_sock, zmq.POLLIN)
    poller.register(data_sock, zmq.POLLIN)

    def introduce(run: str) -> None:
        hello = spool.intros.get(run)
        if hello is None:
            log.warning("expman sync: %s: no hello for run %s in the spool; its frames wait", spool.path, run)
            return
        seq = next(intro_seqs)
        data = proto.encode_frame(proto.HELLO, run=hello.run, host=hello.host, rank=hello.rank, sender=me,
                                  seq=seq, sent_at=time.time(), body={**hello.body, "reopen": True})
        intros.add(Entry(seq, data, len(data)))

    for run in spool.intros:
        introduce(run)
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            intros.expire(now)
            send_due(intro_sock, intros, now)
            if not intros:  # every run introduced: stream the frames, a window at a time
                frames.expire(now)
                while todo and len(frames) < window:
                    frame, data = todo.popleft()
                    frames.add(Entry(frame.seq, data, len(data), tag=frame.run))  # type: ignore[arg-type]
                send_due(data_sock, frames, now)
            if not todo and not frames and not intros:
                return True
            events = dict(poller.poll(50))
            now = time.monotonic()
            if intro_sock in events:
                for ack in read_acks(intro_sock):
                    for seq in ack.seqs:
                        intros.acked(seq, now)
            if data_sock in events:
                for ack in read_acks(data_sock):
                    for seq in ack.seqs:
                        if frames.acked(seq, now) is not None and (ack.info.get(seq) or {}).get("rejected"):
                            log.error("expman sync: the collector rejected a frame: %s", ack.info[seq]["rejected"])
                    for run in ack.unknown_runs:  # the collector forgot the run (it restarted)
                        if not intros:
                            introduce(run)
                        frames.resend_where(lambda entry: entry.tag == run)  # once the hello is in
        return False
    finally:
        intro_sock.close(0)
        data_sock.close(0)


def lock_for_replay(path: Path) -> int | None:
    """An fd holding the file's exclusive lock, or None when a live sender holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _usable(endpoint: str | None) -> bool:
    if not endpoint:
        return False
    if endpoint.startswith("ipc://"):
        return os.path.exists(endpoint[len("ipc://"):])
    return True


def sync_folder(folder: Path, collector: str | None = None, timeout: float = 60.0,
                out: Any = None) -> tuple[int, int, int]:
    """Replay every spool file in `folder` that no live sender holds; delete each one
    whose frames were all acknowledged. Returns (files delivered, frames, files left).

    The collector: `collector`, else $EXPMAN_COLLECTOR, else the one the spool names when
    it is reachable (tcp, or an ipc socket that exists), else a local collector started
    for the runs' root, as `start_experiment()` would.
    """
    delivered = frames = left = 0
    locals_: dict[str, LocalCollector] = {}
    try:
        for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
            fd = lock_for_replay(path)
            if fd is None:
                if out:
                    print(f"{path}: in use by a running process; skipped", file=out)
                left += 1
                continue
            try:
                spool = SpoolFile(path)
                endpoint = collector or os.environ.get(COLLECTOR_ENV) or None
                if endpoint is None and _usable(spool.meta.get("endpoint")):
                    endpoint = spool.meta["endpoint"]
                if endpoint is None:
                    root = next(iter(sorted(spool.roots)), None)
                    if root is None:
                        raise ValueError(f"{path}: no collector given and no run root in the spool")
                    if root not in locals_:
                        locals_[root] = LocalCollector(Path(root))
                    endpoint = locals_[root].endpoint
                t0 = time.monotonic()
                if replay(spool, endpoint, timeout):
                    path.unlink()
                    delivered += 1
                    frames += len(spool.frames)
                    if out:
                        print(f"{path}: {len(spool.frames)} frames delivered to {endpoint} "
                              f"in {time.monotonic() - t0:.2f} s", file=out)
                else:
                    left += 1
                    if out:
                        print(f"{path}: not every frame was acknowledged by {endpoint} within {timeout:g} s; kept",
                              file=out)
            except (ValueError, OSError) as exc:
                left += 1
                log.error("expman sync: %s", exc)
            finally:
                os.close(fd)
    finally:
        for local in locals_.values():
            local.shutdown()
    return delivered, frames, left
