"""The rank-side spool: frames the collector has not acknowledged, on local disk.

When a sender's unacknowledged frames pass its memory budget, further frames are
appended, byte for byte, to one spool file per sender (so sequence numbers and the
collector's duplicate check still hold), and read back in order as acknowledgements
free memory. At exit, whatever is still unacknowledged is written to the spool, and
`expman sync` (expman/_rank/sync.py) delivers it later.

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


class SpillFile:
    """One unnamed, append-only file in the spool folder for media payloads past the rank's
    memory budget (expman/_rank/artifacts.py): one descriptor however many items wait, cut
    back to empty whenever none does. Not thread-safe: the caller holds its lock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.fd: int | None = None
        self.size = 0
        self.live = 0

    def append(self, data: bytes) -> int | None:
        """Where `data` starts in the file, or None when it would grow past max_bytes."""
        if self.size + len(data) > self.max_bytes:
            return None
        if self.fd is None:
            import tempfile

            folder = spool_dir()
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder) as fh:
                self.fd = os.dup(fh.fileno())
        view, at = memoryview(data), self.size
        while view:
            view = view[os.pwrite(self.fd, view, at + len(data) - len(view)):]
        self.size += len(data)
        self.live += 1
        return at

    def release(self) -> None:
        self.live -= 1
        if self.live == 0 and self.fd is not None:
            os.ftruncate(self.fd, 0)
            self.size = 0
