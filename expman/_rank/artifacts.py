"""The rank side of artifacts: snapshot at the call, hand over in the background.

`log_artifact` runs on the training thread, so it only pins the content down and
queues a job; one pump thread per Sender reads, hashes and chunks the content into
`artifact` frames (docs/protocol.md) that the Sender numbers, sends and resends like
every other frame. The collector stores them (collector/_artifacts.py).

What the call pins down, cheapest exact way first (docs/storage.md, "Snapshots"):

1. files up to INLINE_MAX bytes are read during the call: exact;
2. else, on filesystems with reflinks (btrfs, XFS, bcachefs, ...), a copy-on-write clone
   into an unnamed O_TMPFILE beside the file: exact, O(1), nothing left behind;
3. else a descriptor opened during the call, read in the background. Replacing or
   deleting the file afterwards does not matter (the descriptor keeps the old content);
   writing into it before the pump has read it is detected (size or mtime changed) and
   the artifact is dropped with an error: never stored half old, half new;
4. past OPEN_FDS_MAX queued descriptors, only the path and its (size, mtime) are kept;
   any change before the read, replacing included, drops the artifact the same way.

Memory: inline snapshots are bounded by INLINE_BUDGET, chunks in flight by WINDOW_BYTES.
Media (expman/_rank/media.py) ride the same transfers with a descriptor on chunk 0; their
bytes are held in memory up to MEDIA_BUDGET, then appended to one unnamed spill file in
the spool folder (MEDIA_SPILL_BYTES); past both, the item is refused with an error and counted.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expman._wire import frames as proto
from expman._errors import ArtifactError
from expman._rank.channel import RunChannel
from expman._rank.code_capture import collect  # not in the pump thread: see _capture
from expman._rank.spool import SpillFile

if TYPE_CHECKING:
    from expman._rank.sender import Sender

log = logging.getLogger("expman")

INLINE_MAX = 256 * 1024
INLINE_BUDGET = 16 * 1024 * 1024
OPEN_FDS_MAX = 256
WINDOW_BYTES = 32 * 1024 * 1024
WINDOW_FRAMES = 512
MEDIA_BUDGET = 64 * 1024 * 1024
MEDIA_SPILL_BYTES = 1024 * 1024 * 1024
MEDIA_REUSE_BYTES = 32 * 1024 * 1024  # sent media buffers kept for reuse (see ArtifactPump.buffer)
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_no_reflink: set[int] = set()  # st_dev of filesystems where a clone failed


@dataclass(eq=False)
class _Job:
    run: RunChannel
    name: str
    size: int
    logged_at: float
    data: bytes | None = None  # read during the call
    fd: int | None = None  # opened (or cloned) during the call
    path: str | None = None  # only the path: opened by the pump
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) to compare; None: exact snapshot
    media: dict[str, Any] | None = None  # a media descriptor (expman/_rank/media.py)
    media_bytes: int = 0  # counted against MEDIA_BUDGET
    base: int | None = None  # where the content starts in `fd`, the pump's shared spill file


@dataclass(eq=False)
class _CodeJob:
    run: RunChannel
    code_dir: Path | None


@dataclass(eq=False)
class _Transfer:
    job_name: str
    sent: int = 0
    acked: int = 0
    failed: str | None = None


class _Changed(Exception):
    pass


class _Stopped(Exception):
    pass


@dataclass(eq=False)
class ChunkToken:
    """Rides with one chunk frame through the Sender; `acked` runs on the Sender thread."""

    pump: ArtifactPump
    transfer: _Transfer
    run: RunChannel
    nbytes: int
    final: bool = False

    def acked(self, rejected: str | None) -> None:
        self.pump._on_ack(self, rejected)


class ArtifactPump:
    """One per Sender: a thread that turns queued artifacts into chunk frames."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self._cond = threading.Condition()
        self._jobs: deque[_Job | _CodeJob] = deque()
        self._inline_bytes = 0
        self._media_bytes = 0
        self._spill: SpillFile | None = None
        self._reuse: dict[int, list[bytearray]] = {}
        self._reuse_bytes = 0
        self._open_fds = 0
        self._inflight_bytes = 0
        self._inflight_frames = 0
        self._next_transfer = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="expman-artifacts", daemon=True)
        self._thread.start()

    # --- the calling thread --------------------------------------------------------------
    def snapshot(self, run: RunChannel, path: str | os.PathLike[str], name: str,
                 media: dict[str, Any] | None = None) -> None:
        """Pin the file's current content down (see the module doc) and queue it."""
        now = time.time()
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{path} is a directory; use log_artifacts() for folders")
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path} is not a regular file")
        with self._cond:
            inline = st.st_size <= INLINE_MAX and self._inline_bytes + st.st_size <= INLINE_BUDGET
            use_fd = not inline and self._open_fds < OPEN_FDS_MAX
            if inline:
                self._inline_bytes += st.st_size  # reserved now, so two threads cannot both overshoot
            elif use_fd:
                self._open_fds += 1
        job = _Job(run, name, st.st_size, now, media=media)
        try:
            if inline:
                with open(path, "rb") as fh:
                    job.data = fh.read(INLINE_MAX + 1)
                if len(job.data) > INLINE_MAX:  # it grew since the stat: take the descriptor route
                    raise _Changed()
                job.size = len(job.data)
            elif use_fd:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                fst = os.fstat(fd)
                clone = _reflink(fd, fst, str(path))
                if clone is not None:
                    os.close(fd)
                    job.fd, job.size = clone, fst.st_size
                else:
                    job.fd, job.size, job.stamp = fd, fst.st_size, (fst.st_size, fst.st_mtime_ns)
            else:
                job.path, job.stamp = os.fspath(path), (st.st_size, st.st_mtime_ns)
        except _Changed:
            with self._cond:
                self._inline_bytes -= st.st_size
            job.data = None
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fst = os.fstat(fd)
            job.fd, job.size, job.stamp = fd, fst.st_size, (fst.st_size, fst.st_mtime_ns)
            with self._cond:
                self._open_fds += 1
        except BaseException:
            with self._cond:
                if inline:
                    self._inline_bytes -= st.st_size
                elif use_fd:
                    self._open_fds -= 1
            raise
        if inline and job.data is not None and len(job.data) != st.st_size:
            with self._cond:
                self._inline_bytes += len(job.data) - st.st_size
        self._submit(job)

    def buffer(self, size: int) -> bytearray:
        """A buffer of `size` bytes for a media copy: one an earlier item of that size was
        sent from, where there is one. A fresh one costs page faults on first touch (about
        1 ms for 768 KiB in a VM); a reused one only the copy."""
        with self._cond:
            free = self._reuse.get(size)
            if free:
                self._reuse_bytes -= size
                return free.pop()
        return bytearray(size)

    def _reuse_later(self, data: Any) -> None:  # holding self._cond
        if data.__class__ is bytearray and self._reuse_bytes + len(data) <= MEDIA_REUSE_BYTES:
            self._reuse.setdefault(len(data), []).append(data)
            self._reuse_bytes += len(data)

    def submit_bytes(self, run: RunChannel, name: str, data: bytes | bytearray, media: dict[str, Any]) -> None:
        """Queue bytes the caller already copied (a media payload): in memory within
        MEDIA_BUDGET, past it in the spill file; past that too, refused (logged, counted)."""
        with self._cond:
            keep = self._media_bytes + len(data) <= MEDIA_BUDGET
            self._media_bytes += len(data) if keep else 0
            if not keep:
                self._spill = self._spill or SpillFile(MEDIA_SPILL_BYTES)
                at = self._spill.append(data)  # under the lock: the pump may empty the file
                self._reuse_later(data)
                if at is None:
                    run.artifacts.failed += 1
                    log.error("expman: run %s: %s not stored: %d MiB of media wait in memory and %d MiB on disk "
                              "(is the collector down?)", run.uid, name, MEDIA_BUDGET >> 20, MEDIA_SPILL_BYTES >> 20)
                    return
        self._submit(_Job(run, name, len(data), time.time(), data=data if keep else None, media=media,
                          media_bytes=len(data) if keep else 0, fd=None if keep else self._spill.fd,  # type: ignore[union-attr]
                          base=None if keep else at))

    def capture_code(self, run: RunChannel, code_dir: Path | None) -> None:
        self._submit(_CodeJob(run, code_dir))

    def _submit(self, job: _Job | _CodeJob) -> None:
        with self._cond:
            job.run.artifacts.open_jobs += 1
            self._jobs.append(job)
            self._cond.notify_all()

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._spill is not None and self._spill.fd is not None and not self._thread.is_alive():
            os.close(self._spill.fd)
            self._spill.fd = None

    # --- the pump thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    jobs, self._jobs = list(self._jobs), deque()
                    for job in jobs:
                        self._release(job)
                    return
                job = self._jobs.popleft()
            try:
                if isinstance(job, _CodeJob):
                    self._capture(job)
                else:
                    self._transfer(job)
            except _Stopped:
                self._release(job)
                return
            except Exception:  # one bad artifact must not stop the others
                log.exception("expman: run %s: artifact hand-over failed", job.run.uid)
                if isinstance(job, _Job):
                    self._count(job.run, ok=False)
            finally:
                self._release(job)

    def _release(self, job: _Job | _CodeJob) -> None:
        """Give back what the job held, once; wake the Sender so a waiting finish can go."""
        if getattr(job, "_released", False):
            return
        job._released = True  # type: ignore[union-attr]
        with self._cond:
            if isinstance(job, _Job):
                if job.data is not None:
                    if job.media_bytes:
                        self._media_bytes -= job.media_bytes
                        self._reuse_later(job.data)
                    else:
                        self._inline_bytes -= job.size
                    job.data = None
                if job.base is not None and self._spill is not None:
                    self._spill.release()  # shared: emptied once no item waits in it
                    job.fd = None
                if job.fd is not None:
                    os.close(job.fd)
                    job.fd = None
                    self._open_fds -= 1
            job.run.artifacts.open_jobs -= 1
        self.sender.wake()

    def _count(self, run: RunChannel, ok: bool) -> None:
        with self._cond:
            if ok:
                run.artifacts.stored += 1
            else:
                run.artifacts.failed += 1

    def _transfer(self, job: _Job) -> None:
        """Read, hash and send one artifact as chunk frames within the byte window; the
        last chunk only once every earlier one is acknowledged (docs/protocol.md). One
        loop over the content with its checks inline: the order of the steps is the point."""
        run = job.run
        chunk = proto.ARTIFACT_CHUNK_BYTES
        with self._cond:
            transfer_id = self._next_transfer
            self._next_transfer += 1
        transfer = _Transfer(job.name)
        fd = job.fd
        own_fd = None
        try:
            if job.data is None and fd is None:  # path only: open now and check nothing changed
                try:
                    own_fd = fd = os.open(job.path, os.O_RDONLY | os.O_CLOEXEC)  # type: ignore[arg-type]
                except OSError as exc:
                    raise _Changed(f"it could not be opened any more: {exc.strerror}") from None
                self._check(fd, job)
            total = max(1, -(-job.size // chunk))
            hasher = hashlib.sha256()
            for index in range(total):
                offset = index * chunk
                want = min(chunk, job.size - offset)
                if job.data is not None:
                    data = (bytes(memoryview(job.data)[offset : offset + want]) if job.data.__class__ is bytearray
                            else job.data[offset : offset + want])
                else:
                    try:
                        data = os.pread(fd, want, (job.base or 0) + offset)  # type: ignore[arg-type]
                    except OSError as exc:
                        raise _Changed(f"reading it failed: {exc}") from None
                    if len(data) != want:
                        raise _Changed("it shrank while being read")
                    self._check(fd, job)  # type: ignore[arg-type]
                hasher.update(data)
                last = index == total - 1
                if last:
                    self._wait_acked(transfer)
                if transfer.failed:
                    return
                body = proto.artifact_body(
                    transfer_id, index, data, last, name=job.name, size=job.size, chunk=chunk,
                    encrypt=run.artifacts.encrypt, logged_at=job.logged_at,
                    sha256=hasher.hexdigest() if last else None, media=job.media,
                )
                self._send(run, body, ChunkToken(self, transfer, run, len(data), final=last))
                if index == 0 and not last:
                    self._wait_acked(transfer)  # a refused first chunk stops the transfer before the rest
        except _Changed as exc:
            reason = (f"could not be read ({exc}); not stored" if str(exc).startswith("reading it failed")
                      else f"the file changed after log_artifact() and before it was read ({exc}); not stored")
            log.error("expman: run %s: artifact %r: %s. Log a copy, or write a new file instead of rewriting it.",
                      run.uid, job.name, reason)
            with self._cond:
                already_failed = transfer.failed is not None
                transfer.failed = transfer.failed or reason  # counted once, here
            if not already_failed:
                self._count(run, ok=False)
            if transfer.sent and not already_failed:  # tell the collector to drop what it staged
                self._wait_acked(transfer, everything=True)
                body = proto.artifact_body(transfer_id, transfer.sent, b"", True, name=job.name, size=job.size,
                                           chunk=chunk, encrypt=run.artifacts.encrypt,
                                           logged_at=job.logged_at, abort=reason)
                self._send(run, body, ChunkToken(self, transfer, run, 0))
        finally:
            if own_fd is not None:
                os.close(own_fd)

    @staticmethod
    def _check(fd: int, job: _Job) -> None:
        if job.stamp is None:
            return
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != job.stamp:
            raise _Changed(f"size {job.stamp[0]} -> {st.st_size}" if st.st_size != job.stamp[0] else "modified")

    def _send(self, run: RunChannel, body: dict[str, Any], token: ChunkToken | None, kind: str = proto.ARTIFACT) -> None:
        """Queue a frame for the Sender, waiting while the window is full."""
        n = token.nbytes if token is not None else 0
        with self._cond:
            while (self._inflight_frames >= WINDOW_FRAMES
                   or (self._inflight_bytes and self._inflight_bytes + n > WINDOW_BYTES)):
                if self._stopping:
                    raise _Stopped()
                self._cond.wait(0.5)
            if token is not None:
                self._inflight_bytes += n
                self._inflight_frames += 1
                token.transfer.sent += 1
        run.control.append(("frame", (kind, body, token)))
        self.sender.wake()

    def _wait_acked(self, transfer: _Transfer, everything: bool = False) -> None:
        """Until every chunk sent is acknowledged (or, unless `everything`, one is refused)."""
        with self._cond:
            while transfer.acked < transfer.sent and (everything or not transfer.failed):
                if self._stopping:
                    raise _Stopped()
                self._cond.wait(0.5)

    def _on_ack(self, token: ChunkToken, rejected: str | None) -> None:
        with self._cond:
            self._inflight_bytes -= token.nbytes
            self._inflight_frames -= 1
            transfer = token.transfer
            transfer.acked += 1
            if rejected and not transfer.failed:
                transfer.failed = rejected
                token.run.artifacts.failed += 1
                log.error("expman: run %s: artifact %r was not stored: %s", token.run.uid, transfer.job_name, rejected)
            elif token.final and not transfer.failed:
                token.run.artifacts.stored += 1
            self._cond.notify_all()

    # --- code capture -------------------------------------------------------------------------
    def _capture(self, job: _CodeJob) -> None:
        # `collect` is imported with this module, never here: an import in this thread holds
        # the module's import lock, and a process forked meanwhile inherits it held by a
        # thread it does not have, so its own pump's first code capture waited forever.
        run = job.run
        capture = collect(job.code_dir, exclude=[run.root])
        for name, path in capture.files:
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                capture.skip(name, f"unreadable: {exc}")
                continue
            self._transfer(_Job(run, name, len(data), time.time(), data=data))
        if capture.diff is not None:
            self._transfer(_Job(run, capture.diff_name, len(capture.diff), time.time(), data=capture.diff))
        self._send(run, {"code": capture.meta()}, None, kind=proto.CODE)


# --- the calling thread's entry points (Experiment.log_artifact / log_artifacts) ---------------

_pumps: dict[int, ArtifactPump] = {}
_pumps_lock = threading.Lock()


def pump_for(sender: Sender) -> ArtifactPump:
    with _pumps_lock:
        pump = _pumps.get(id(sender))
        if pump is None or pump.sender is not sender:
            pump = _pumps[id(sender)] = ArtifactPump(sender)
        return pump


def _forget_after_fork() -> None:
    """A forked child has none of the parent's pump threads (expman/_rank/start.py)."""
    global _pumps_lock
    _pumps_lock = threading.Lock()
    _pumps.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def stop_all() -> None:
    with _pumps_lock:
        pumps = list(_pumps.values())
        _pumps.clear()
    for pump in pumps:
        pump.stop()


def _reflink(fd: int, st: os.stat_result, path: str) -> int | None:
    """A copy-on-write clone of `fd` in an unnamed temp file on the same filesystem, or
    None where the filesystem (or platform) cannot: then the caller falls back."""
    if st.st_dev in _no_reflink or not hasattr(os, "O_TMPFILE"):
        return None
    try:
        clone = os.open(os.path.dirname(os.path.abspath(path)), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            _no_reflink.add(st.st_dev)
        return None
    try:
        fcntl.ioctl(clone, _FICLONE, fd)
        return clone
    except OSError:
        os.close(clone)
        _no_reflink.add(st.st_dev)
        return None
