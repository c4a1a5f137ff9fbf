"""The write-ahead log: numbered segment files of records (framing: expman/_storage/records.py).

The collector appends each metrics frame, exactly as received, before acknowledging it;
once a segment's frames are in a Parquet part the segment is deleted. Readers and a
restarting collector replay what is left, stopping at the first torn or corrupt record,
so a crash mid-write loses only the record that was being written (never acknowledged).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Callable, Iterator

from expman._storage.files import LOCAL, Files
from expman._storage.records import OVERHEAD, iter_records, record_header

_SUFFIX = ".wal"
_IOV_MAX = 1024  # pieces per writev (Linux's limit)


def _load_syncfs() -> Callable[[int], None] | None:
    """syncfs(2) through libc, where there is one (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int) -> None:
        if call(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return syncfs


_syncfs = _load_syncfs()


def segment_path(folder: Path, number: int) -> Path:
    return folder / f"{number:08d}{_SUFFIX}"


def list_segments(folder: PurePath, files: Files = LOCAL) -> list[tuple[int, PurePath]]:
    """(number, path) of each segment, oldest first."""
    out = []
    for name in files.names(folder):
        if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
            out.append((int(name[: -len(_SUFFIX)]), folder / name))
    return sorted(out)


RECORD_OVERHEAD = OVERHEAD  # bytes a record takes beyond its payload


def read_records(path: PurePath, files: Files = LOCAL, start: int = 0) -> Iterator[bytes]:
    """Yield whole records from byte `start` on (a record boundary); stop quietly at a torn
    or corrupt tail."""
    try:
        data = files.read_bytes(path)
    except FileNotFoundError:
        return
    yield from iter_records(data, start)


class SegmentWriter:
    """Appends records to the current segment of one folder; `rotate()` seals it.

    Appends are kept in memory as they came (a record header beside each payload, no
    copy) and written by `sync()` in one writev per IOV_MAX pieces. A failed sync (a full disk,
    an I/O error) truncates the segment back to the last synced record and discards the
    buffer, so the segment holds only whole records the caller was told were durable.
    `sync_file` is the seam a test replaces to play a full disk (tests/_enospc_collector.py).
    """

    sync_file: Callable[[int], None] = staticmethod(os.fsync)
    # One commit for every segment written on a filesystem (Linux syncfs), or None where
    # there is none: the collector's group commit (collector/_server.py). A seam too.
    sync_filesystem: Callable[[int], None] | None = staticmethod(_syncfs) if _syncfs is not None else None

    def __init__(self, folder: Path, number: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.number = number
        self._fd = self._open()
        self.records = 0
        self._pieces: list[bytes] = []  # record headers and payloads, not yet written
        self._size = 0

    def _open(self) -> int:
        fd = os.open(segment_path(self.folder, self.number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._committed = os.lseek(fd, 0, os.SEEK_END)
        return fd

    def append(self, payload: bytes) -> None:
        header = record_header(payload)
        self._pieces += (header, payload)
        self._size += len(header) + len(payload)
        self.records += 1

    def _write_pieces(self) -> None:
        pieces, at = self._pieces, 0
        while at < len(pieces):
            batch = pieces[at:at + _IOV_MAX]
            written = os.writev(self._fd, batch)
            for piece in batch:  # a short write (rare, regular files): go on from where it stopped
                if written < len(piece):
                    pieces[at] = memoryview(piece)[written:]
                    break
                written -= len(piece)
                at += 1

    def sync(self, fsync: bool = True) -> None:
        """Make appended records durable (called once per receive batch, not per record);
        `fsync=False` only writes them, for a group commit (`sync_filesystem`) to follow.

        On failure nothing of this batch stays in the segment, and the error is raised."""
        if not self._pieces:
            return
        try:
            self._write_pieces()
            if fsync:
                self.sync_file(self._fd)
        except OSError:
            self._pieces, self._size = [], 0
            self.truncate(self._committed)
            raise
        self._committed += self._size
        self._pieces, self._size = [], 0

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def committed(self) -> int:
        """Bytes of the segment written by `sync`."""
        return self._committed

    def truncate(self, size: int) -> None:
        """Cut the segment back to `size` bytes (a group commit that failed)."""
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            pass  # a torn tail is cut by the reader at its first bad record
        self._committed = min(self._committed, size)

    def rotate(self) -> int:
        """Seal the current segment and start the next; return the sealed segment's number."""
        self.sync()
        os.close(self._fd)
        sealed = self.number
        self.number += 1
        self._fd = self._open()
        self.records = 0
        return sealed

    def close(self) -> None:
        try:
            self.sync()
        finally:
            os.close(self._fd)
