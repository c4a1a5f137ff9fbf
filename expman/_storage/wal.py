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
from expman._storage.records import OVERHEAD, frame_record, iter_records

_SUFFIX = ".wal"


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

    Appends are buffered in memory and written by `sync()`. A failed sync (a full disk,
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
        self._buffer = bytearray()

    def _open(self) -> int:
        fd = os.open(segment_path(self.folder, self.number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._committed = os.lseek(fd, 0, os.SEEK_END)
        return fd

    def append(self, payload: bytes) -> None:
        self._buffer += frame_record(payload)
        self.records += 1

    def sync(self, fsync: bool = True) -> None:
        """Make appended records durable (called once per receive batch, not per record);
        `fsync=False` only writes them, for a group commit (`sync_filesystem`) to follow.

        On failure nothing of this batch stays in the segment, and the error is raised."""
        if not self._buffer:
            return
        try:
            data = bytes(self._buffer)
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:] if written else data)
            if fsync:
                self.sync_file(self._fd)
        except OSError:
            self._buffer.clear()
            self.truncate(self._committed)
            raise
        self._committed += len(self._buffer)
        self._buffer.clear()

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
