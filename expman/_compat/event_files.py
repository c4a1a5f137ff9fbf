"""TensorBoard event files of scalars, written with numpy: a whole batch of points at once;
and the few media events an export adds (images, histograms, audio), one at a time.

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

Media events are built by hand too, as the protobufs TensorBoard's `summary.proto` names
(`Summary.Value` field 4 `Image`, 5 `HistogramProto`, 6 `Audio`), so an export needs no
protobuf or TensorBoard package; EventAccumulator reads them as images, histograms, audio.
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
    n &= (1 << 64) - 1  # a negative int64 as protobuf writes it: ten bytes, two's complement
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


def _masked_crc32c_of(data: bytes) -> bytes:
    """The masked CRC-32C of one buffer, a byte at a time (~0.1 s a MB: media events are
    few; `masked_crc32c` does many rows at once, a column at a time)."""
    table = _crc_table().tolist()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def _frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked_crc32c_of(length) + data + _masked_crc32c_of(data)


def _tag_prefix(tag: bytes) -> bytes:
    """The bytes from the Event's summary field up to the float value, for one tag."""
    value = b"\x0a" + _varint(len(tag)) + tag + b"\x15"
    value_len = len(value) + 4
    summary = b"\x0a" + _varint(value_len)
    return b"\x2a" + _varint(len(summary) + value_len) + summary + value


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _double(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<d", value)


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(int(value))


def _doubles(number: int, values: np.ndarray) -> bytes:
    """A packed repeated double field."""
    return _field(number, np.ascontiguousarray(values, dtype="<f8").tobytes())


def image_value(tag: str, encoded: bytes, height: int, width: int, channels: int) -> bytes:
    """`Summary.Value` of an encoded image (PNG, JPEG, GIF, ...): `Image` {height, width,
    colorspace (the channels: 1, 2, 3 or 4), encoded_image_string}."""
    image = _int(1, height) + _int(2, width) + _int(3, channels) + _field(4, encoded)
    return _field(1, tag.encode()) + _field(4, image)


def histogram_value(tag: str, edges: np.ndarray, counts: np.ndarray, total: float | None = None) -> bytes:
    """`Summary.Value` of a histogram as TensorBoard keeps one: `HistogramProto` {min, max,
    num, sum, sum_squares, bucket_limit (each bucket's upper edge), bucket (counts)}; the
    first bucket starts at `min`. `total` is the values' sum when known, else it and
    sum_squares are taken from the bucket centres."""
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    sum_ = float(counts @ centres) if total is None else float(total)
    histo = (_double(1, float(edges[0])) + _double(2, float(edges[-1])) + _double(3, float(counts.sum()))
             + _double(4, sum_) + _double(5, float(counts @ centres**2)) + _doubles(6, edges[1:]) + _doubles(7, counts))
    return _field(1, tag.encode()) + _field(5, histo)


def audio_value(tag: str, encoded: bytes, sample_rate: float, channels: int, frames: int,
                content_type: str = "audio/wav") -> bytes:
    """`Summary.Value` of an encoded clip: `Audio` {sample_rate, num_channels, length_frames,
    encoded_audio_string, content_type}."""
    audio = (struct.pack("<B", 1 << 3 | 5) + struct.pack("<f", sample_rate) + _int(2, channels) + _int(3, frames)
             + _field(4, encoded) + _field(5, content_type.encode()))
    return _field(1, tag.encode()) + _field(6, audio)


class ScalarEventFile:
    """One event file (`events.out.tfevents.<time>.<host>`) in `folder`, written in batches."""

    def __init__(self, folder: str | os.PathLike[str], wall_time: float | None = None, suffix: str = "expman") -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        now = time.time() if wall_time is None else wall_time
        self.path = Path(folder) / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{suffix}"
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

    def write_values(self, step: int, wall_time: float, values: list[bytes]) -> None:
        """One event of summary values (`image_value`, `histogram_value`, `audio_value`)."""
        summary = b"".join(_field(1, v) for v in values)
        self._fh.write(_frame(_double(1, wall_time) + _int(2, step) + _field(5, summary)))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ScalarEventFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ScalarEventFile", "audio_value", "histogram_value", "image_value", "masked_crc32c"]
