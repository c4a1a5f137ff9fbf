"""The rank-side spool: frames the collector has not acknowledged, on local disk.

When a sender's unacknowledged frames pass its memory budget, further frames are
appended, byte for byte, to one spool file per sender (so sequence numbers and the
collector's duplicate check still hold), and read back in order as acknowledgements
free memory. At exit, whatever is still unacknowledged is written to the spool, and
`expman sync` (`replay_folder`) delivers it later.

A spool file is a sequence of records framed like the write-ahead log
(expman/_storage/records.py: length, crc32, payload). Record 0 is a msgpack map of facts about the sender
(`spool`: format version, `endpoint`, `sender`, `host`, `pid`, `created_at`); then come
introductions (hello frames with no sequence number: what a replayer needs to introduce
each run to a collector that has never heard of it), then frames exactly as sent.

While a sender uses its file it holds an exclusive flock on it; `expman sync` skips
files it cannot lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import msgpack

from expman._storage.records import OVERHEAD, frame_record, iter_records, payload_length
from expman._wire import frames as proto

log = logging.getLogger("expman")

SPOOL_VERSION = 1
SUFFIX = ".spool"
DEFAULT_MAX_SPOOL_BYTES = 1 << 30  # 1 GiB per sender
SPOOL_DIR_ENV = "EXPMAN_SPOOL_DIR"
MAX_SPOOL_ENV = "EXPMAN_MAX_SPOOL_BYTES"


def spool_dir() -> Path:
    """$EXPMAN_SPOOL_DIR, else $XDG_STATE_HOME/expman/spool, else ~/.local/state/expman/spool."""
    explicit = os.environ.get(SPOOL_DIR_ENV)
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "expman" / "spool"


def max_spool_bytes(value: int | None = None) -> int:
    if value is not None:
        return int(value)
    env = os.environ.get(MAX_SPOOL_ENV)
    return int(env) if env else DEFAULT_MAX_SPOOL_BYTES


def read_records(path: Path) -> Iterator[bytes]:
    """Whole records, in order; stops quietly at a torn or corrupt tail."""
    return iter_records(path.read_bytes())


def _meta(endpoint: str, sender: str) -> bytes:
    return msgpack.packb({"spool": SPOOL_VERSION, "endpoint": endpoint, "sender": sender,
                          "host": socket.gethostname(), "pid": os.getpid(), "created_at": time.time()})


class Spool:
    """One sender's spool file: appended at the end, read back from the front.

    Only the sender thread touches it. `size` (bytes of frames in the file) is bounded by
    `max_bytes`; a full file whose front has been read is compacted before it says no.
    """

    def __init__(self, folder: Path, endpoint: str, sender: str, intros: list[bytes], max_bytes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = folder / f"{sender}{SUFFIX}"
        self.max_bytes = max_bytes
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        head = frame_record(_meta(endpoint, sender)) + b"".join(frame_record(i) for i in intros)
        os.write(self._fd, head)
        self._head = head
        self._write_at = len(head)
        self._read_at = len(head)

    @property
    def size(self) -> int:
        return self._write_at - len(self._head)

    def append(self, data: bytes, force: bool = False) -> bool:
        """Append one frame; False (nothing written) when the spool is full, unless `force`."""
        rec = frame_record(data)
        if not force and self.size + len(rec) > self.max_bytes:
            if self._read_at > len(self._head):
                self._compact()
            if self.size + len(rec) > self.max_bytes:
                return False
        os.pwrite(self._fd, rec, self._write_at)
        self._write_at += len(rec)
        return True

    def read_next(self) -> bytes:
        """The next unread frame (the sender keeps count of how many there are)."""
        length = payload_length(os.pread(self._fd, OVERHEAD, self._read_at))
        data = os.pread(self._fd, length, self._read_at + OVERHEAD)
        self._read_at += OVERHEAD + length
        return data

    def unread(self) -> bytes:
        return os.pread(self._fd, self._write_at - self._read_at, self._read_at) if self._write_at > self._read_at else b""

    def _compact(self) -> None:
        """Drop the records already read back into memory: rewrite head + unread tail."""
        tail = self.unread()
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, self._head + tail)
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = fd
        self._read_at = len(self._head)
        self._write_at = len(self._head) + len(tail)

    def close(self, delete: bool) -> None:
        if delete:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)


def write_final(folder: Path, endpoint: str, sender: str, intros: list[bytes], frames: list[bytes],
                tail: bytes = b"") -> Path:
    """At exit: every unacknowledged frame (in-memory ones, then `tail`, the spool's unread
    records) into the sender's spool file, written to a temp name, fsynced and renamed."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{sender}{SUFFIX}"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        os.chmod(tmp, 0o600)
        fh.write(frame_record(_meta(endpoint, sender)))
        for item in intros:
            fh.write(frame_record(item))
        for data in frames:
            fh.write(frame_record(data))
        fh.write(tail)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


# --- replay (`expman sync`) ----------------------------------------------------------------

class SpoolFile:
    """A spool file read for replay: its facts, introductions and frames."""

    def __init__(self, path: Path) -> None:
        self.path = path
        records = list(read_records(path))
        if not records:
            raise ValueError(f"{path}: not a spool file (no header)")
        self.meta: dict[str, Any] = msgpack.unpackb(records[0], raw=False)
        if not isinstance(self.meta, dict) or self.meta.get("spool") != SPOOL_VERSION:
            raise ValueError(f"{path}: not a spool file of version {SPOOL_VERSION}")
        self.intros: dict[str, proto.Frame] = {}  # run id -> its hello
        self.frames: list[tuple[proto.Frame, bytes]] = []
        for data in records[1:]:
            try:
                frame = proto.decode_frame(data)
            except Exception as exc:  # noqa: BLE001 - a bad record costs that record, said aloud
                log.error("expman: %s: skipping an unreadable frame: %s", path, exc)
                continue
            if frame.kind == proto.HELLO:
                self.intros[frame.run] = frame
            if frame.seq is not None:
                self.frames.append((frame, data))

    @property
    def roots(self) -> set[str]:
        return {str(f.body.get("root")) for f in self.intros.values() if f.body.get("root")}


def replay(spool: SpoolFile, endpoint: str, timeout: float = 60.0, window: int = 256,
           resend_after: float = 2.0) -> bool:
    """Send a spool file's frames, in order, to a collector; True once all are acknowledged.

    Runs are introduced first with their hello, from a socket and sender id of the
    replayer's own (the original hello's sequence number may lie below what the collector
    has already seen from that sender); a collector that answers `unknown_runs` later
    (it restarted) gets them again. Frames go out exactly as spooled, on a second socket,
    so acks (which carry sequence numbers only) are never ambiguous.
    """
    import zmq

    ctx = zmq.Context.instance()
    socks = []
    for _ in range(2):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.connect(endpoint)
        socks.append(s)
    intro_sock, data_sock = socks
    me = f"sync-{uuid.uuid4().hex}"
    next_seq = 0
    intros: dict[int, tuple[bytes, float]] = {}  # our hello seq -> (data, sent_at)
    todo = list(range(len(spool.frames) - 1, -1, -1))  # pop() gives the next frame in order
    in_flight: dict[int, tuple[int, float]] = {}  # frame seq -> (index, sent_at)
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    poller.register(intro_sock, zmq.POLLIN)
    poller.register(data_sock, zmq.POLLIN)

    def introduce(run: str) -> None:
        nonlocal next_seq
        hello = spool.intros.get(run)
        if hello is None:
            log.warning("expman sync: %s: no hello for run %s in the spool; its frames wait", spool.path, run)
            return
        data = proto.encode_frame(proto.HELLO, run=hello.run, host=hello.host, rank=hello.rank, sender=me,
                                  seq=next_seq, sent_at=time.time(), body={**hello.body, "reopen": True})
        intros[next_seq] = (data, 0.0)
        next_seq += 1

    def send(sock: zmq.Socket, data: bytes) -> bool:
        try:
            sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def acks(sock: zmq.Socket) -> Iterator[proto.Ack]:
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield proto.decode_ack(data)
            except Exception as exc:  # noqa: BLE001
                log.warning("expman sync: ignoring a reply that is not an ack: %s", exc)

    for run in spool.intros:
        introduce(run)
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            for seq, (data, sent_at) in list(intros.items()):
                if now - sent_at > resend_after and send(intro_sock, data):
                    intros[seq] = (data, now)
            if not intros:  # every run introduced: stream the frames, a window at a time
                for seq, (index, sent_at) in list(in_flight.items()):
                    if now - sent_at > resend_after and send(data_sock, spool.frames[index][1]):
                        in_flight[seq] = (index, now)
                while todo and len(in_flight) < window:
                    frame, data = spool.frames[todo[-1]]
                    if not send(data_sock, data):
                        break
                    in_flight[frame.seq] = (todo.pop(), now)  # type: ignore[index]
            if not todo and not in_flight and not intros:
                return True
            events = dict(poller.poll(50))
            if intro_sock in events:
                for ack in acks(intro_sock):
                    for seq in ack.seqs:
                        intros.pop(seq, None)
            if data_sock in events:
                for ack in acks(data_sock):
                    for seq in ack.seqs:
                        if in_flight.pop(seq, None) is not None:
                            rejected = (ack.info.get(seq) or {}).get("rejected")
                            if rejected:
                                log.error("expman sync: the collector rejected a frame: %s", rejected)
                    for run in ack.unknown_runs:  # the collector forgot the run (it restarted)
                        if not intros:
                            introduce(run)
                        for seq, (index, _) in list(in_flight.items()):
                            if spool.frames[index][0].run == run:
                                in_flight[seq] = (index, 0.0)  # resent once the hello is in
        return False
    finally:
        for s in socks:
            s.close(0)


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
    from expman._env import COLLECTOR_ENV
    from expman._rank.local_collector import LocalCollector

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
