"""The write-ahead log format: numbered segment files of length- and CRC-framed records.

The collector appends each metrics frame, exactly as received, before acknowledging it;
once a segment's frames are in a Parquet part the segment is deleted. Readers and a
restarting collector replay what is left, stopping at the first torn or corrupt record,
so a crash mid-write loses only the record that was being written (never acknowledged).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
_SUFFIX = ".wal"


def segment_path(folder: Path, number: int) -> Path:
    return folder / f"{number:08d}{_SUFFIX}"


def list_segments(folder: Path) -> list[tuple[int, Path]]:
    """(number, path) of each segment, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
            out.append((int(name[: -len(_SUFFIX)]), folder / name))
    return sorted(out)


def read_records(path: Path) -> Iterator[bytes]:
    """Yield whole records; stop quietly at a torn or corrupt tail."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        yield payload
        offset = start + length


class SegmentWriter:
    """Appends records to the current segment of one folder; `rotate()` seals it."""

    def __init__(self, folder: Path, number: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.number = number
        self._file = open(segment_path(folder, number), "ab")
        self.records = 0
        self._dirty = False

    def append(self, payload: bytes) -> None:
        self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)))
        self._file.write(payload)
        self.records += 1
        self._dirty = True

    def sync(self) -> None:
        """Make appended records durable (called once per receive batch, not per record)."""
        if self._dirty:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._dirty = False

    def rotate(self) -> int:
        """Seal the current segment and start the next; return the sealed segment's number."""
        self.sync()
        self._file.close()
        sealed = self.number
        self.number += 1
        self._file = open(segment_path(self.folder, self.number), "ab")
        self.records = 0
        return sealed

    def close(self) -> None:
        self.sync()
        self._file.close()
