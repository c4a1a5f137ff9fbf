"""Record framing for append-only files: a length, a CRC-32 and the payload.

The one owner of the framing that the collector's write-ahead log (expman/_storage/wal.py)
and the rank's spool (expman/_rank/spool.py) share. A reader stops quietly at the first
torn or corrupt record, so a crash mid-append costs only the record being written.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterator

HEADER = struct.Struct("<II")  # payload length, crc32(payload)
OVERHEAD = HEADER.size  # bytes a record takes beyond its payload


def record_header(payload: bytes) -> bytes:
    """What goes before `payload` to make it a record (a writer may write the two apart)."""
    return HEADER.pack(len(payload), zlib.crc32(payload))


def frame_record(payload: bytes) -> bytes:
    """`payload` as one record."""
    return record_header(payload) + payload


def iter_records(data: bytes, start: int = 0) -> Iterator[bytes]:
    """Whole records of `data` from byte `start` on (a record boundary), in order."""
    offset = start
    while offset + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, offset)
        begin = offset + HEADER.size
        payload = data[begin : begin + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        yield payload
        offset = begin + length


def payload_length(header: bytes) -> int:
    """The payload length a record's header announces."""
    return HEADER.unpack(header)[0]
