"""The point ring: what a rank's `log_metric` accepted, in a shared-memory file, so the
host's collector can store it when the process is killed before its sender shipped it.

A contract between the rank (which writes) and the collector on the same host (which
reads after the rank's death), so it lives below both. One file per run and process,
`<folder>/<hash of sender, run, rank>.ring`, 0600, in a 0700 folder of the user (the
first of `ring_dirs()` with room; the collector looks in all of them):

    header   4 KiB   static identity (magic, sizes, sender, run, rank, host, pid), then
                     the sender's counters: frames written to the table, name bytes, time,
                     and `settled`: every point below it is stored or in the spool
    table    frames  one entry per metrics frame the sender made of ring points: (seq or
                     -1 when the frame was dropped, end point number, sent_at); entry k
                     covers points [end of k-1, end of k)
    names    bytes   (key id u32, length u16, UTF-8 name), appended when a key is interned
    columns  points  capacity (a power of two) slots each, point n in slot n % capacity:
                     values f64, steps i64, times f64, key ids i32, flags u8

The ring is the rank's one buffer of plain points: the hot path writes point n's value,
step and then key id (three memoryview stores, the key id last: a slot whose key id is
-1 holds nothing), and the sender thread reads the columns back as a frame's binary
columns (slices, no per-point Python work). A slot is written again only once the sender
has settled the point it held (acknowledged by the collector, spilled to the spool or
dropped) and cleared its key id, so every live slot at or above `settled` holds the point
its position names: no per-slot number is needed. The hot path counts in slots of the
current lap (`slot`, below `stop`; `put` starts the next lap), so point n is
`base + slot` and a write needs no modulo. When no slot is free the hot path puts the
point in the run's Python list instead and closes the ring (`stop` -1) until the sender
has framed that list, which keeps the points in order (expman/_rank/sender.py).

Memory is taken as it is needed, not at start: the file is sparse, and the writer maps
writable (MADV_POPULATE_WRITE) the header page, the first `FIRST_SLOTS` slots of each
column, and the table's and names' pages as they fill; the sender thread, when it drains
the run, maps each column ahead of the hot path up to `AHEAD_SLOTS` past it (and the rank
thread does when it catches up with what is mapped), until the first lap has covered the
ring. The hot path writes only below `ready` (`stop` never exceeds it), so it never takes a
page fault, and a full filesystem is an error of the advice, never a SIGBUS. The header's
`ready` tells the collector where the first lap's mapped slots end (beyond it the key ids
read 0, not -1). Kernels without the advice (before 5.14) get the whole file reserved and
its key ids cleared at start, as before.

The live process holds a POSIX record lock (`lockf`) on the file for its whole life: the
kernel drops it when the process dies, kill -9 included, and a forked child does not
inherit it, so "the lock is free" means "the writer is gone". The file is made under a
temporary name, locked, and only then renamed into place.
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("expman")

MAGIC = b"EXPRING2"
VERSION = 3  # 3: the header's `ready` (the first lap's mapped slots)
RING_DIR_ENV = "EXPMAN_RING_DIR"
RING_POINTS_ENV = "EXPMAN_RING_POINTS"  # slots per run (rounded up to a power of two); 0 turns the ring off
DEFAULT_POINTS = 1 << 18  # 7.25 MiB of columns per run
TABLE_ENTRIES = 8192
NAMES_BYTES = 1 << 20
HEADER_BYTES = 4096
SLOT_BYTES = 8 + 8 + 8 + 4 + 1  # value, step, time, key id, flags
FIRST_SLOTS = 1024  # mapped at start (an idle run holds ~40 KiB), and by the rank thread when it catches up
AHEAD_SLOTS = 1 << 16  # the most the sender maps ahead of the hot path (a few of its drains at the run's pace)
SLOT_ALIGN = 512  # `ready` moves in these: a page of the 8-byte columns
GROW_SLOTS = 16384  # the most mapped under the lock at once (~300 µs: what the rank thread may wait)

HAS_STEP, HAS_TIME, NO_VALUE, WRITTEN = 1, 2, 4, 8  # the flags of a recovered point (Recovered.frames)
NO_STEP, TIMED = 1, 2  # a slot's flags column: 0 for the hot path's points (a step, no time)
_STATIC = struct.Struct("<8sIIQII128s128s256sQ")  # magic, version, slot bytes, capacity, table, names, sender, run, host, pid
_RANK = struct.Struct("<q")
_COUNTERS = struct.Struct("<QQdqq")  # frames in the table, name bytes used, updated at, settled, ready
_COUNTERS_AT = 1024
_RANK_AT = 1016
_ENTRY = struct.Struct("<qqd")  # frame seq (-1: dropped), end point number, sent_at
_NAME = struct.Struct("<IH")
_EMPTY_KEY = struct.pack("<i", -1)


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
    """Whether a ring of `size` bytes may go to `folder`: the last one always (mapping its
    first slots says whether they fit; later ones that do not take the list); a memory
    folder only while it, and the machine's memory, keep SHM_SPARE_BYTES free beside a
    full ring (a tmpfs as large as the RAM would otherwise let many runs' rings take the
    memory training needs)."""
    if last:
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    available = _memory_available()
    return st.f_bavail * st.f_frsize >= size + SHM_SPARE_BYTES and (
        available is None or available >= size + SHM_SPARE_BYTES)


def _memory_available() -> int | None:
    """The kernel's estimate of memory available without swapping (bytes), None where unknown."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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


def _capacity(requested: int) -> int:
    """Slots for `requested` points: a power of two, so a slot is `n & mask`."""
    return 1 << max(requested - 1, 1).bit_length()


@dataclass(frozen=True)
class _Layout:
    """Offsets in the file: the table, the names, each column (page-aligned), and the size."""

    capacity: int
    table: int = HEADER_BYTES
    names: int = HEADER_BYTES + TABLE_ENTRIES * _ENTRY.size

    @property
    def values(self) -> int:
        return -(-(self.names + NAMES_BYTES) // mmap.PAGESIZE) * mmap.PAGESIZE

    @property
    def steps(self) -> int:
        return self.values + 8 * self.capacity

    @property
    def times(self) -> int:
        return self.steps + 8 * self.capacity

    @property
    def keys(self) -> int:
        return self.times + 8 * self.capacity

    @property
    def flags(self) -> int:
        return self.keys + 4 * self.capacity

    @property
    def size(self) -> int:
        return self.flags + self.capacity


_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_madvise: Any = None  # libc's, through ctypes (loaded at the first ring): it lets go of the GIL, mmap.madvise does not


def _map_writable(mm: mmap.mmap, start: int, stop: int, hold_gil: bool = False) -> bool:
    """Fault the pages of [start, stop) in, writable, now (rounded out to whole pages): a
    shared mapping starts with no page mapped for writing, so a first write to each page
    takes a ~10 µs fault, and allocates it (on a full filesystem: SIGBUS). The kernel's
    work (~2.5 µs a page) runs without the GIL, so the training thread runs meanwhile,
    unless `hold_gil` (the training thread itself: letting go would hand the GIL to the
    sender for up to a switch interval). False when the kernel refuses the advice or
    cannot allocate the pages."""
    global _madvise
    start -= start % mmap.PAGESIZE
    stop = min(-(-stop // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
    if stop <= start:
        return True
    if hold_gil:
        try:
            mm.madvise(_MADV_POPULATE_WRITE, start, stop - start)
        except (OSError, ValueError):
            return False
        return True
    import ctypes

    if _madvise is None:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    return _madvise(ctypes.addressof(ctypes.c_char.from_buffer(mm)) + start, stop - start, _MADV_POPULATE_WRITE) == 0


class NoRing:
    """The hot path's ring where there is none (off, a remote collector, a finished run,
    a forked child): no slot is ever free, so every point takes the list."""

    __slots__ = ("slot", "stop", "capacity", "values", "steps", "keys")

    def __init__(self) -> None:
        self.slot = 0
        self.stop = -1
        self.capacity = -1
        self.values = self.steps = self.keys = None  # never written: no slot is below `stop`

    def put(self, kid: int, value: float, step: int | None, when: float | None) -> bool:
        return False


class PointRing:
    """The writer's side: one run of this process. The hot path (expman/_rank/experiment.py)
    reads `slot` and `stop` and stores into `values`, `steps`, `keys` itself; `put` is
    for the points the plain record does not fit, and starts each lap. The sender thread
    calls the rest."""

    __slots__ = ("slot", "stop", "base", "mask", "values", "steps", "keys", "times", "flags", "path", "capacity",
                 "settled", "ready", "_fd", "_layout", "_head", "_mm", "_frames", "_names_used",
                 "_table_mapped", "_names_mapped", "_growing", "_short", "wake")

    def __init__(self, path: Path, fd: int, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self.mask = capacity - 1
        self.base = 0  # the number of this lap's slot 0
        self.slot = 0  # the next point's slot in this lap: it is point base + slot
        self.stop = 0  # the hot path writes a slot only below this (-1: closed); never above `ready`
        self.settled = 0  # every point below this is stored, spooled or dropped: its slot is free
        self.ready = 0  # the first lap's slots mapped writable, key ids cleared (all of them after it)
        self._fd = fd
        self._layout = lay = _Layout(capacity)
        self._head = mmap.mmap(fd, lay.values)
        self._mm = mmap.mmap(fd, lay.size - lay.values, offset=lay.values)
        self._growing = threading.Lock()  # one of the sender and the rank thread maps more at a time
        view = memoryview(self._mm)
        at = lambda offset: offset - lay.values  # noqa: E731 - column offsets within the mapping
        self.values = view[at(lay.values) : at(lay.steps)].cast("d")
        self.steps = view[at(lay.steps) : at(lay.times)].cast("q")
        self.times = view[at(lay.times) : at(lay.keys)].cast("d")
        self.keys = view[at(lay.keys) : at(lay.flags)].cast("i")
        self.flags = view[at(lay.flags) :]
        self._frames = 0
        self._names_used = 0
        self._table_mapped, self._names_mapped = lay.table, lay.names  # mapped writable below these
        self._short = False  # no room to map more slots was logged
        self.wake: Callable[[], None] | None = None  # calls the sender when the hot path catches up (it maps more)
        if _map_writable(self._head, 0, HEADER_BYTES):
            if not self.grow(FIRST_SLOTS):
                raise OSError("no room for the ring's first slots")
        else:  # no MADV_POPULATE_WRITE: all of it now, so a full filesystem is an error here, never a SIGBUS later
            os.posix_fallocate(fd, 0, lay.size)
            self._table_mapped, self._names_mapped = lay.names, lay.values
            self.keys[:] = memoryview(_EMPTY_KEY * capacity).cast("i")
            self.ready = self.stop = capacity

    def grow(self, upto: int, rank_thread: bool = False) -> bool:
        """Map the first lap's slots writable up to `upto` (rounded up to SLOT_ALIGN), at
        most GROW_SLOTS at a time under the lock (the rank thread may wait on it: a point
        must not go to the list, where a kill would lose it), clear their key ids, say so
        in the header, then let the hot path write them. False when there is no room."""
        while True:
            lo = self.ready
            hi = min(-(-upto // SLOT_ALIGN) * SLOT_ALIGN, self.capacity, lo + GROW_SLOTS)
            if hi <= lo or lo < 0:
                return lo >= 0
            with self._growing:
                if self.ready != lo:  # another thread mapped these meanwhile
                    continue
                lay = self._layout
                for column, width in ((lay.values, 8), (lay.steps, 8), (lay.times, 8), (lay.keys, 4), (lay.flags, 1)):
                    if not _map_writable(self._mm, column - lay.values + lo * width,
                                         column - lay.values + hi * width, rank_thread):
                        if not self._short:
                            self._short = True
                            log.warning("expman: ring %s: no room to map more slots; later points wait in memory",
                                        self.path)
                        return False
                self.keys[lo:hi] = memoryview(_EMPTY_KEY * (hi - lo)).cast("i")
                self._counters(hi)  # before the hot path may write there: the collector reads up to `ready`
                self.ready = hi
                if self.stop == lo:  # open, and bounded by what was mapped (no call since the read: no switch)
                    self.stop = hi

    @classmethod
    def create(cls, sender: str, run: str, rank: int, host: str) -> PointRing | None:
        """A new ring for this process's `run`, or None (ring off, or no room: logged once)."""
        try:
            requested = int(os.environ.get(RING_POINTS_ENV) or DEFAULT_POINTS)
        except ValueError:
            requested = DEFAULT_POINTS
        if requested <= 0:
            return None
        capacity = _capacity(requested)
        size = _Layout(capacity).size
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
            os.ftruncate(fd, size)  # sparse: pages are allocated as they are mapped (PointRing.grow)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ring = cls(path, fd, capacity)
            _STATIC.pack_into(ring._head, 0, MAGIC, VERSION, SLOT_BYTES, capacity, TABLE_ENTRIES, NAMES_BYTES,
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

    def put(self, kid: int, value: float, step: int | None, when: float | None) -> bool:
        """Write a point the hot path's plain record does not fit (no step, a time, an int
        beyond float64 or a step beyond int64); False when no slot is free."""
        flags = 0
        try:
            value = float(value)
        except OverflowError:
            value = math.inf if value > 0 else -math.inf
        if step is None or not -(2**63) <= step < 2**63:
            flags, step = NO_STEP, 0
        if when is not None:
            flags |= TIMED
        i = self.slot  # from here to the count's bump no call (but to map more: then read again): no other
        # thread can take the slot (experiment.py)
        if i == self.capacity and self.stop >= 0 and self.settled > self.base:  # the lap is over: the next one
            self.base += self.capacity
            i = self.slot = 0
            self.stop = self.settled + self.capacity - self.base
        if i >= self.stop:
            if not i == self.stop == self.ready < self.capacity:
                return False
            self._catch_up(i)
            i = self.slot  # another thread may have written while this one mapped (calls: thread switches)
            if i >= self.stop:
                return False
        self.flags[i] = flags
        self.times[i] = 0.0 if when is None else when
        self.values[i] = value
        self.steps[i] = step
        self.keys[i] = kid
        self.slot = i + 1
        return True

    def _catch_up(self, i: int) -> None:
        """The hot path reached the mapped slots before the sender mapped more (it slept
        through a burst, or is mapping them now): map a few here and wake it to map far ahead."""
        self.grow(i + FIRST_SLOTS, rank_thread=True)
        if self.wake is not None:
            self.wake()

    @property
    def n(self) -> int:
        """The points written: the next point's number."""
        return self.base + self.slot

    def name(self, kid: int, key: str) -> None:
        """Record a key's name (the caller interns under a lock); past the names area the
        key's points cannot be recovered."""
        data = key.encode()
        end = self._names_used + _NAME.size + len(data)
        if end > NAMES_BYTES:
            return
        at = self._layout.names + self._names_used
        if not self._writable(at + _NAME.size + len(data), names=True):
            return
        self._head[at + _NAME.size : at + _NAME.size + len(data)] = data
        _NAME.pack_into(self._head, at, kid, len(data))
        self._names_used = end
        self._counters()

    # --- the sender thread's side -------------------------------------------------------
    def columns(self, start: int, stop: int) -> tuple[bytes, bytes, bytes | list[int | None], list[float | None] | None]:
        """Points [start, stop) as a metrics frame's columns: key ids (int32), values
        (float64), steps (int64, or a list with None where a point has none) and times
        (None when no point has one). C-level copies; a per-point loop only for a
        slice with points of the general write."""
        a = start & self.mask
        b = a + stop - start
        pieces = [(a, b)] if b <= self.capacity else [(a, self.capacity), (0, b - self.capacity)]

        def take(column: memoryview) -> bytes:
            return b"".join(column[x:y].tobytes() for x, y in pieces)

        ids, values, steps, flags = take(self.keys), take(self.values), take(self.steps), take(self.flags)
        if flags.count(0) == len(flags):
            return ids, values, steps, None
        step_list: list[int | None] = list(memoryview(steps).cast("q"))
        when = list(memoryview(take(self.times)).cast("d"))
        times: list[float | None] = [None] * len(flags)
        for j, f in enumerate(flags):
            if f & NO_STEP:
                step_list[j] = None
            if f & TIMED:
                times[j] = when[j]
        has_times = any(t is not None for t in times)
        return ids, values, step_list if None in step_list else steps, times if has_times else None

    def framed(self, seq: int, end: int, sent_at: float) -> None:
        """The sender made a metrics frame (seq; -1 when it was dropped) of the points up
        to `end`: the collector recovers a frame's points only if it never stored that seq."""
        k = self._frames
        if self.ready < 0 or not self._writable(self._layout.table + (min(k, TABLE_ENTRIES - 1) + 1) * _ENTRY.size,
                                                names=False):
            self.ready = self.stop = -1  # no room to note the frame: the ring keeps no more points for recovery
            self.settle(end)
            return
        _ENTRY.pack_into(self._head, self._layout.table + (k % TABLE_ENTRIES) * _ENTRY.size, seq, end, sent_at)
        self._frames = k + 1
        self._counters()

    def settle(self, upto: int) -> None:
        """Points below `upto` are stored, spooled or dropped: free their slots (key ids
        first, then the count the collector starts reading at)."""
        start = self.settled
        if upto <= start:
            return
        a = start & self.mask
        b = a + upto - start
        for x, y in ([(a, b)] if b <= self.capacity else [(a, self.capacity), (0, b - self.capacity)]):
            self.keys[x:y] = memoryview(_EMPTY_KEY * (y - x)).cast("i")
            self.flags[x:y] = bytes(y - x)
        self.settled = upto
        self._counters()

    def _writable(self, stop: int, names: bool) -> bool:
        """Map the table's (sender thread) or the names' (the intern lock's holder) pages
        writable up to offset `stop`; each area has its own pages and its own mark. False
        when there is no room."""
        mapped = self._names_mapped if names else self._table_mapped
        if stop <= mapped:
            return True
        if not _map_writable(self._head, mapped, stop):
            return False
        mapped = -(-stop // mmap.PAGESIZE) * mmap.PAGESIZE
        if names:
            self._names_mapped = mapped
        else:
            self._table_mapped = mapped
        return True

    def _counters(self, ready: int | None = None) -> None:
        _COUNTERS.pack_into(self._head, _COUNTERS_AT, self._frames, self._names_used, time.time(), self.settled,
                            self.ready if ready is None else ready)

    def remove(self) -> None:
        """Delete the file: its points are stored, or in the spool. The mapping stays valid
        until nothing refers to it, so a call racing with this never meets a closed buffer."""
        self.stop = -1
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
    lost: int = 0  # points logged with unknown keys, or whose write the kill cut short
    device: int = 0  # device tensors: their values are never in the ring (always 0 in this version)


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
    magic, version, slot, capacity, tcap, ncap, sender, run, host, _pid = _STATIC.unpack_from(data, 0)
    if (version != VERSION or slot != SLOT_BYTES or tcap != TABLE_ENTRIES or ncap != NAMES_BYTES or capacity <= 0
            or capacity & (capacity - 1)):
        return None
    lay = _Layout(capacity)
    if len(data) < lay.size:
        return None
    frames_made, names_used, touched, settled, ready = _COUNTERS.unpack_from(data, _COUNTERS_AT)
    out = Recovered(sender.rstrip(b"\0").decode(errors="replace"), run.rstrip(b"\0").decode(errors="replace"),
                    _RANK.unpack_from(data, _RANK_AT)[0], host.rstrip(b"\0").decode(errors="replace"))
    out.names = dict(_names(data, lay.names, min(names_used, NAMES_BYTES)))
    slots = _Slots(data, lay, settled, ready)
    out.end = slots.end()
    entries = [_ENTRY.unpack_from(data, lay.table + (k % TABLE_ENTRIES) * _ENTRY.size)
               for k in range(max(0, frames_made - TABLE_ENTRIES), frames_made)]
    start = 0 if frames_made <= TABLE_ENTRIES else None  # the start of the oldest entry kept
    for seq, end, sent_at in entries:
        if start is not None and seq >= 0 and not stored(out.sender, seq):
            out.frames.append((seq, sent_at, _take(slots, start, end, out)))
        start = end
    if start is None:  # every entry was overwritten: only the unframed tail is known
        start = out.end
    out.frames.append((None, touched, _take(slots, start, out.end, out)))
    out.frames = [f for f in out.frames if f[2]]
    return out


def _names(data: bytes, at: int, used: int) -> Iterator[tuple[int, str]]:
    pos = 0
    while pos + _NAME.size <= used:
        kid, length = _NAME.unpack_from(data, at + pos)
        pos += _NAME.size
        yield kid, data[at + pos : at + pos + length].decode(errors="replace")
        pos += length


class _Slots:
    """The ring's columns, read point by point where needed (a collector reads only the
    points it lacks, not all of a ring, while other runs wait for their acks). Point n
    is live in slot n % capacity when settled <= n < settled + capacity, n is below
    `ready` while the first lap is not all mapped (-1: the ring gave up), and the slot's
    key id is set: the writer never wrote past a lap beyond `settled`, nor past `ready`,
    and cleared every slot below it."""

    def __init__(self, data: bytes, lay: _Layout, settled: int, ready: int) -> None:
        view = memoryview(data)
        self._mask = lay.capacity - 1
        self.settled = settled
        self._limit = settled + lay.capacity if ready >= lay.capacity else min(settled + lay.capacity, ready)
        self._values = view[lay.values : lay.steps].cast("d")
        self._steps = view[lay.steps : lay.times].cast("q")
        self._times = view[lay.times : lay.keys].cast("d")
        self._keys = view[lay.keys : lay.flags].cast("i")
        self._flags = view[lay.flags : lay.size]

    def end(self) -> int:
        """One past the newest point (`settled` when none is live)."""
        for n in range(self._limit - 1, self.settled - 1, -1):
            if self._keys[n & self._mask] >= 0:
                return n + 1
        return self.settled

    def get(self, n: int) -> tuple[int, int, float, int, float] | None:
        """Point n as (key id, recovered flags, value, step, time), or None where its slot
        holds none (settled, or a write the kill cut short)."""
        if not self.settled <= n < self._limit:
            return None
        i = n & self._mask
        kid = self._keys[i]
        if kid < 0:
            return None
        f = self._flags[i]
        flags = WRITTEN | (0 if f & NO_STEP else HAS_STEP) | (HAS_TIME if f & TIMED else 0)
        return kid, flags, self._values[i], self._steps[i] if flags & HAS_STEP else 0, self._times[i] if f & TIMED else 0.0


def _take(slots: _Slots, start: int, end: int, out: Recovered) -> list[tuple[int, int, float, int, float]]:
    points = []
    for n in range(max(start, slots.settled), end):  # below `settled`: stored, spooled or dropped
        record = slots.get(n)
        if record is None or record[0] not in out.names:
            out.lost += 1
        else:
            points.append(record)
    return points
