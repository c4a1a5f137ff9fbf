"""The point ring: what a rank's `log_metric` accepted, in a shared-memory file, so the
host's collector can store it when the process is killed before its sender shipped it.

A contract between the rank (which writes) and the collector on the same host (which
reads after the rank's death), so it lives below both. One file per run and process,
`<folder>/<hash of sender, run, rank>.ring`, 0600, in a 0700 folder of the user (the
first of `ring_dirs()` with room; the collector looks in all of them):

    header   4 KiB   static identity (magic, sizes, sender, run, rank, host, pid), then
                     the sender's counters: frames written to the table, name bytes, time
    table    frames  one entry per metrics frame the sender made: (seq or -1 when the
                     frame was dropped, end point number, sent_at); entry k covers points
                     [end of k-1, end of k)
    names    bytes   (key id u32, length u16, UTF-8 name), appended when a key is interned
    records  points  40 bytes each, point n in slot n % capacity: key id i32, flags i32,
                     value f64, step i64, time f64, n i64 (last, so a record cut by the
                     kill is told by its n)

Point n of the ring is point n of the run's hot-path list (the same thread writes both,
ring first), so the sender names each frame's points by their ring numbers without
touching the records. The live process holds a POSIX record lock (`lockf`) on the file
for its whole life: the kernel drops it when the process dies, kill -9 included, and a
forked child does not inherit it, so "the lock is free" means "the writer is gone".
The file is made under a temporary name, locked, and only then renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import stat
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("expman")

MAGIC = b"EXPRING1"
VERSION = 1
RING_DIR_ENV = "EXPMAN_RING_DIR"
RING_POINTS_ENV = "EXPMAN_RING_POINTS"  # records per run; 0 turns the ring off
DEFAULT_POINTS = 1 << 18  # 10 MiB of records per run
TABLE_ENTRIES = 8192
NAMES_BYTES = 1 << 20
HEADER_BYTES = 4096

HAS_STEP, HAS_TIME, NO_VALUE, WRITTEN = 1, 2, 4, 8  # record flags; NO_VALUE: a device tensor, read only by the sender
FAST_FLAGS = WRITTEN | HAS_STEP  # the hot path passes it as the literal 9
RECORD = struct.Struct("<iidqdq")  # key id, flags, value, step, time, n
FAST = struct.Struct("<iidq8xq")  # the hot path's record (no time); its offset is the literal n * 40 % span
assert RECORD.size == FAST.size == 40 and FAST_FLAGS == 9
_STATIC = struct.Struct("<8sIIQII128s128s256sQ")  # magic, version, record size, capacity, table, names, sender, run, host, pid
_RANK = struct.Struct("<q")
_COUNTERS = struct.Struct("<QQd")  # frames in the table, name bytes used, updated at
_COUNTERS_AT = 1024
_RANK_AT = 1016
_ENTRY = struct.Struct("<qqd")  # frame seq (-1: dropped), end point number, sent_at
_NAME = struct.Struct("<IH")


SHM_SPARE_BYTES = 256 << 20  # /dev/shm is used only while this much more stays free


def ring_dirs() -> list[Path]:
    """The folders rings live in, in the order a rank tries them: $EXPMAN_RING_DIR alone
    when set; else /dev/shm/expman-<uid> (memory, no writeback), then
    <tmp>/expman-<uid>-rings (the page cache outlives the process just as well; for a
    small /dev/shm, as containers have by default, that data loaders need)."""
    if os.environ.get(RING_DIR_ENV):
        return [Path(os.environ[RING_DIR_ENV])]
    uid = os.getuid()
    folders = [Path(f"/dev/shm/expman-{uid}")] if os.path.isdir("/dev/shm") else []
    return folders + [Path(tempfile.gettempdir()) / f"expman-{uid}-rings"]


def _roomy(folder: Path, size: int, last: bool) -> bool:
    if last:
        return True  # posix_fallocate says whether it fits
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= size + SHM_SPARE_BYTES


def near(endpoint: str, here: str) -> bool:
    """Whether a collector at `endpoint` runs on this host (only it can read our rings)."""
    if endpoint.startswith("ipc://"):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1", here) or host.startswith("127.")


def ring_path(folder: Path, sender: str, run: str, rank: int) -> Path:
    """A fixed-length name from wire fields: nothing a peer sends can steer the path."""
    return folder / (hashlib.sha256(f"{sender}\0{run}\0{rank}".encode()).hexdigest()[:32] + ".ring")


def private_folder(folder: Path, make: bool = True) -> bool:
    """Whether `folder` is a real folder of this user that no one else may enter (made
    0700 first with `make`). Rings are trusted only there: another user who made the
    folder first could otherwise plant points in our runs."""
    try:
        if make:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0


def _layout(capacity: int) -> tuple[int, int, int, int]:
    """Offsets of the table, the names and the records, and the file size."""
    table_at = HEADER_BYTES
    names_at = table_at + TABLE_ENTRIES * _ENTRY.size
    records_at = -(-(names_at + NAMES_BYTES) // mmap.PAGESIZE) * mmap.PAGESIZE
    return table_at, names_at, records_at, records_at + capacity * RECORD.size


def _no_record(*_args: Any) -> None:
    """Stands in for the ring's write where there is none (off, failed, or the run finished)."""


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


def _map_writable(mm: mmap.mmap) -> None:
    """Fault every page of the records in, writable, now: a shared mapping starts with
    no page mapped for writing (MAP_POPULATE maps them read-only), so the first lap's
    first write to each page took a ~10 µs fault, one log_metric call in a hundred.
    Older kernels refuse the advice: their faults stay."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError):
        pass


class PointRing:
    """The writer's side: one run of this process. The hot path uses `mm`, `span` and
    `put_fast` directly (expman/_rank/experiment.py); the rest is for rarer calls."""

    def __init__(self, path: Path, fd: int, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self.span = capacity * RECORD.size
        self._fd = fd
        self._table_at, self._names_at, records_at, _size = _layout(capacity)
        self._head = mmap.mmap(fd, records_at)
        self.mm = mmap.mmap(fd, self.span, offset=records_at)
        _map_writable(self.mm)
        self.put_fast: Callable[..., None] = FAST.pack_into
        self._frames = 0
        self._names_used = 0

    @classmethod
    def create(cls, sender: str, run: str, rank: int, host: str) -> PointRing | None:
        """A new ring for this process's `run`, or None (ring off, or no room: logged once)."""
        try:
            capacity = int(os.environ.get(RING_POINTS_ENV) or DEFAULT_POINTS)
        except ValueError:
            capacity = DEFAULT_POINTS
        if capacity <= 0:
            return None
        size = _layout(capacity)[3]
        folders = ring_dirs()
        folder = next((f for i, f in enumerate(folders) if private_folder(f) and _roomy(f, size, i == len(folders) - 1)),
                      None)
        if folder is None:
            log.warning("expman: none of %s is a private folder of this user; points are not kept for recovery",
                        ", ".join(map(str, folders)))
            return None
        path = ring_path(folder, sender, run, rank)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = -1
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.posix_fallocate(fd, 0, size)  # all of it now: a full tmpfs is an error here, never a SIGBUS later
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ring = cls(path, fd, capacity)
            _STATIC.pack_into(ring._head, 0, MAGIC, VERSION, RECORD.size, capacity, TABLE_ENTRIES, NAMES_BYTES,
                              sender.encode()[:128], run.encode()[:128], host.encode()[:256], os.getpid())
            _RANK.pack_into(ring._head, _RANK_AT, rank)
            ring._counters()
            os.rename(tmp, path)
            return ring
        except (OSError, ValueError) as exc:
            if fd >= 0:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            log.warning("expman: no point ring for run %s in %s (%s); a kill -9 may lose the last points", run,
                        folder, exc)
            return None

    def put(self, kid: int, n: int, value: Any, step: Any, when: float | None) -> None:
        """Any point the hot path's fixed record does not fit: no step, a time, a huge int,
        a device tensor (value not read here: reading it would wait for the device)."""
        flags = WRITTEN
        if value.__class__ is float or value.__class__ is int:
            try:
                value = float(value)
            except OverflowError:
                value = math.inf if value > 0 else -math.inf
        else:
            flags |= NO_VALUE
            value = math.nan
        if step is not None and -(2**63) <= step < 2**63:
            flags |= HAS_STEP
        else:
            step = 0
        if when is not None:
            flags |= HAS_TIME
        RECORD.pack_into(self.mm, n % self.capacity * RECORD.size, kid, flags, value, step,
                         0.0 if when is None else when, n)

    def name(self, kid: int, key: str) -> None:
        """Record a key's name (the caller interns under a lock); past the names area the
        key's points cannot be recovered."""
        data = key.encode()
        end = self._names_used + _NAME.size + len(data)
        if end > NAMES_BYTES:
            return
        at = self._names_at + self._names_used
        self._head[at + _NAME.size : at + _NAME.size + len(data)] = data
        _NAME.pack_into(self._head, at, kid, len(data))
        self._names_used = end
        self._counters()

    def framed(self, seq: int, end: int, sent_at: float) -> None:
        """The sender made a metrics frame (seq; -1 when it was dropped) of the points up
        to `end`: the collector recovers a frame's points only if it never stored that seq."""
        k = self._frames
        _ENTRY.pack_into(self._head, self._table_at + (k % TABLE_ENTRIES) * _ENTRY.size, seq, end, sent_at)
        self._frames = k + 1
        self._counters()

    def _counters(self) -> None:
        _COUNTERS.pack_into(self._head, _COUNTERS_AT, self._frames, self._names_used, time.time())

    def remove(self) -> None:
        """Delete the file: its points are stored, or in the spool. The mapping stays valid
        until nothing refers to it, so a call racing with this never meets a closed buffer."""
        self.put_fast = _no_record
        try:
            os.unlink(self.path)
        except OSError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- the collector's side ---------------------------------------------------------------------


@dataclass
class Recovered:
    """What a dead writer's ring holds beyond what the collector stored, as frames to store."""

    sender: str
    run: str
    rank: int
    host: str
    frames: list[tuple[int | None, float, list[tuple[int, int, float, int, float]]]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    end: int = 0  # one past the last point the ring holds
    lost: int = 0  # points the ring had already overwritten, or logged with unknown keys
    device: int = 0  # device tensors: their values were never in the ring


def is_abandoned(path: Path) -> bool | None:
    """True when no live process holds the ring (its writer is gone), False when one does,
    None when the file is gone. Probes with a lock it releases at once."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, _STATIC.size, 0)
        if len(head) == _STATIC.size and head[:8] == MAGIC and _STATIC.unpack(head)[-1] == os.getpid():
            return False  # ours (a collector inside a rank's process, in tests): the probe would drop our lock
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops our own lock too (POSIX locks are per process)
    return True


def updated_at(path: Path) -> float:
    """When the writer last touched the ring's header (wall-clock seconds), 0 if unreadable."""
    try:
        with open(path, "rb") as fh:
            fh.seek(_COUNTERS_AT)
            return _COUNTERS.unpack(fh.read(_COUNTERS.size))[2]
    except (OSError, struct.error):
        return 0.0


def read_ring(path: Path, stored: Callable[[str, int], bool]) -> Recovered | None:
    """The points of a dead writer's ring that the collector has not stored: per table
    entry whose seq `stored` says was never taken (under that seq, so a later resend or
    spool replay is a duplicate), and the points after the last frame (seq None: the
    caller names them). None for a file that is not a ring of this version."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
            if os.fstat(fh.fileno()).st_uid != os.getuid():
                return None  # not written by a process of ours
            data = fh.read()
    except OSError:
        return None
    if len(data) < HEADER_BYTES or data[:8] != MAGIC:
        return None
    magic, version, rsize, capacity, tcap, ncap, sender, run, host, _pid = _STATIC.unpack_from(data, 0)
    if version != VERSION or rsize != RECORD.size or tcap != TABLE_ENTRIES or ncap != NAMES_BYTES or capacity <= 0:
        return None
    table_at, names_at, records_at, size = _layout(capacity)
    if len(data) < size:
        return None
    frames_made, names_used, touched = _COUNTERS.unpack_from(data, _COUNTERS_AT)
    out = Recovered(sender.rstrip(b"\0").decode(errors="replace"), run.rstrip(b"\0").decode(errors="replace"),
                    _RANK.unpack_from(data, _RANK_AT)[0], host.rstrip(b"\0").decode(errors="replace"))
    out.names = dict(_names(data, names_at, min(names_used, NAMES_BYTES)))
    records = _Records(data, records_at, capacity)
    out.end = records.end()
    lowest = out.end - capacity  # points below this were overwritten
    entries = [_ENTRY.unpack_from(data, table_at + (k % TABLE_ENTRIES) * _ENTRY.size)
               for k in range(max(0, frames_made - TABLE_ENTRIES), frames_made)]
    start = 0 if frames_made <= TABLE_ENTRIES else None  # the start of the oldest entry kept
    for seq, end, sent_at in entries:
        if start is not None and seq >= 0 and not stored(out.sender, seq):
            out.frames.append((seq, sent_at, _take(records, start, end, lowest, out)))
        start = end
    if start is None:  # every entry was overwritten: only the unframed tail is known
        start = out.end
    out.frames.append((None, touched, _take(records, start, out.end, lowest, out)))
    out.frames = [f for f in out.frames if f[2]]
    return out


def _names(data: bytes, at: int, used: int) -> Iterator[tuple[int, str]]:
    pos = 0
    while pos + _NAME.size <= used:
        kid, length = _NAME.unpack_from(data, at + pos)
        pos += _NAME.size
        yield kid, data[at + pos : at + pos + length].decode(errors="replace")
        pos += length


class _Records:
    """The ring's records, read one by one where needed (a collector reads only the points
    it lacks, not all of a 10 MiB ring, while other runs wait for their acks)."""

    def __init__(self, data: bytes, at: int, capacity: int) -> None:
        self._data, self._at, self._capacity = data, at, capacity
        self._region = memoryview(data)[at : at + capacity * RECORD.size]

    def end(self) -> int:
        """One past the newest point. Numbers only grow, and a record cut by the kill holds
        zeros or a prefix of its number (pack_into zeroes it, then writes n last), so the
        largest n in any slot is the newest whole record, if that slot says so."""
        top = max(self._region.cast("q")[4 :: 5])
        return top + 1 if self.get(top) is not None else top

    def get(self, n: int) -> tuple[int, int, float, int, float] | None:
        """Point n's record, or None where its slot holds another point or none."""
        kid, flags, value, step, when, number = RECORD.unpack_from(self._data, self._at + n % self._capacity * RECORD.size)
        return (kid, flags, value, step, when) if flags & WRITTEN and number == n else None


def _take(records: _Records, start: int, end: int, lowest: int,
          out: Recovered) -> list[tuple[int, int, float, int, float]]:
    points = []
    if start < lowest:  # overwritten before the collector stored them
        out.lost += min(end, lowest) - start
        start = lowest
    for n in range(max(start, 0), end):
        record = records.get(n)
        if record is None or record[0] not in out.names:
            out.lost += 1
        elif record[1] & NO_VALUE:
            out.device += 1
        else:
            points.append(record)
    return points
