"""TensorBoard event files of scalars, written with numpy: a whole batch of points at once.

TensorBoard's own writer builds and frames one protobuf per point in Python (about 10k
points/s); this writes the same bytes, columnwise. An event file is a sequence of
TFRecords (length, masked CRC-32C of the length, data, masked CRC-32C of the data), and a
scalar point's data is always the same protobuf shape:

    Event   { 1: wall_time (double), 2: step (varint), 5: Summary }
    Summary { 1: Value { 1: tag (string), 2: simple_value (float) } }

Points are grouped by tag and each group is built as one 2-D byte array (its steps as
varints padded to the widest, which protobuf readers accept), its CRCs computed a byte
column at a time over all rows. A tag's points keep their order; tags follow one another
(version 2 event files are not purged when steps go back across tags).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import numpy as np

_CRC_TABLE: np.ndarray | None = None
_MASK_DELTA = 0xA282EAD8


def _crc_table() -> np.ndarray:
    global _CRC_TABLE
    if _CRC_TABLE is None:
        table = np.arange(256, dtype=np.uint32)
        for _ in range(8):
            table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
        _CRC_TABLE = table
    return _CRC_TABLE


def masked_crc32c(rows: np.ndarray) -> np.ndarray:
    """TFRecord's masked CRC-32C (Castagnoli) of each row of a 2-D uint8 array."""
    table = _crc_table()
    crc = np.full(rows.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    for column in np.ascontiguousarray(rows.T):
        crc = table[(crc ^ column) & 0xFF] ^ (crc >> 8)
    crc ^= np.uint32(0xFFFFFFFF)
    return (((crc >> 15) | (crc << 17)) + np.uint32(_MASK_DELTA)).astype(np.uint32)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_columns(values: np.ndarray, width: int) -> np.ndarray:
    """Each uint64 of `values` as a varint of exactly `width` bytes (all need that width)."""
    out = np.empty((values.shape[0], width), dtype=np.uint8)
    rest = values.copy()
    for i in range(width):
        out[:, i] = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest >>= np.uint64(7)
        if i < width - 1:
            out[:, i] |= 0x80
    return out


def _frame(data: bytes) -> bytes:
    rows = np.frombuffer(data, dtype=np.uint8)[None, :]
    length = struct.pack("<Q", len(data))
    return (length + masked_crc32c(np.frombuffer(length, dtype=np.uint8)[None, :]).tobytes() + data
            + masked_crc32c(rows).tobytes())


def _tag_prefix(tag: bytes) -> bytes:
    """The bytes from the Event's summary field up to the float value, for one tag."""
    value = b"\x0a" + _varint(len(tag)) + tag + b"\x15"
    value_len = len(value) + 4
    summary = b"\x0a" + _varint(value_len)
    return b"\x2a" + _varint(len(summary) + value_len) + summary + value


class ScalarEventFile:
    """One event file (`events.out.tfevents.<time>.<host>`) in `folder`, written in batches."""

    def __init__(self, folder: str | os.PathLike[str], wall_time: float | None = None) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        now = time.time() if wall_time is None else wall_time
        self.path = Path(folder) / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.expman"
        self._fh = open(self.path, "wb")
        version = b"\x09" + struct.pack("<d", now) + b"\x1a" + _varint(len(b"brain.Event:2")) + b"brain.Event:2"
        self._fh.write(_frame(version))

    def write(self, tags: list[bytes], tag_index: np.ndarray, steps: np.ndarray, values: np.ndarray,
              wall_times: np.ndarray) -> None:
        """Append one event per point: `tag_index` picks from `tags`. Each tag's points keep
        their order; the tags follow one another (the order of their first points)."""
        if tag_index.shape[0] == 0:
            return
        step_bits = steps.astype(np.int64).view(np.uint64)
        order = np.argsort(tag_index, kind="stable")
        sorted_tags = tag_index[order]
        bounds = np.flatnonzero(np.diff(sorted_tags)) + 1
        groups = np.split(order, bounds)
        groups.sort(key=lambda rows: rows[0])
        for rows in groups:
            tag = tags[int(tag_index[rows[0]])]
            chosen = step_bits[rows]
            width = len(_varint(int(chosen.max())))  # the widest step's; the others are padded to it
            self._fh.write(self._records(_tag_prefix(tag), width, chosen, values[rows], wall_times[rows]).tobytes())

    @staticmethod
    def _records(prefix: bytes, width: int, steps: np.ndarray, values: np.ndarray, wall_times: np.ndarray) -> np.ndarray:
        n = steps.shape[0]
        data_len = 1 + 8 + 1 + width + len(prefix) + 4
        data = np.empty((n, data_len), dtype=np.uint8)
        data[:, 0] = 0x09
        data[:, 1:9] = np.ascontiguousarray(wall_times, dtype="<f8").view(np.uint8).reshape(n, 8)
        data[:, 9] = 0x10
        data[:, 10:10 + width] = _varint_columns(steps, width)
        start = 10 + width
        data[:, start:start + len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        data[:, start + len(prefix):] = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(n, 4)
        length = np.frombuffer(struct.pack("<Q", data_len), dtype=np.uint8)
        head = np.concatenate([length, masked_crc32c(length[None, :]).view(np.uint8)])
        records = np.empty((n, 12 + data_len + 4), dtype=np.uint8)
        records[:, :12] = head
        records[:, 12:12 + data_len] = data
        records[:, 12 + data_len:] = masked_crc32c(data).astype("<u4").view(np.uint8).reshape(n, 4)
        return records

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ScalarEventFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ScalarEventFile", "masked_crc32c"]
