"""The WAL writes a turn's records with writev, straight from the payloads it was given:
every record lands whole and in order, even when the kernel takes fewer bytes a call."""

from __future__ import annotations

import os

import pytest

from expman._storage import wal
from expman._storage.wal import SegmentWriter, read_records, segment_path


@pytest.mark.parametrize("most", [None, 7])  # None: the kernel's writev; 7: at most 7 bytes a call
def test_records_land_whole_and_in_order(tmp_path, monkeypatch, most):
    if most is not None:
        real = os.writev

        def short(fd: int, buffers: list) -> int:
            data = b"".join(bytes(b) for b in buffers)[:most]
            return real(fd, [data])

        monkeypatch.setattr(wal.os, "writev", short)
    monkeypatch.setattr(wal, "_IOV_MAX", 3)  # more records than one writev takes
    payloads = [bytes([i]) * (i * 13 % 50) for i in range(40)]  # empty ones too
    writer = SegmentWriter(tmp_path, 0)
    for p in payloads[:25]:
        writer.append(p)
    writer.sync()
    for p in payloads[25:]:
        writer.append(p)
    writer.sync(fsync=False)
    assert writer.committed == os.path.getsize(segment_path(tmp_path, 0))
    writer.close()
    assert list(read_records(segment_path(tmp_path, 0))) == payloads


def test_a_failed_write_leaves_only_what_was_durable(tmp_path, monkeypatch):
    writer = SegmentWriter(tmp_path, 0)
    writer.append(b"kept")
    writer.sync()
    writer.append(b"lost" * 100)

    def full(fd: int, buffers: list) -> int:
        os.write(fd, bytes(buffers[0])[:3])  # a torn start, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal.os, "writev", full)
    with pytest.raises(OSError):
        writer.sync()
    monkeypatch.undo()
    writer.append(b"after")
    writer.sync()
    writer.close()
    assert list(read_records(segment_path(tmp_path, 0))) == [b"kept", b"after"]
