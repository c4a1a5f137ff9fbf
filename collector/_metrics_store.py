"""One run's metrics on disk: write-ahead segments first, then Parquet parts.

Frames are appended to the current WAL segment before they are acknowledged. Every
flush seals the segment and writes its rows as a new part, sorted by key with a key index
in its footer (expman/_storage/key_index.py: a reader of one key decodes only that key);
parts are merged eight at a time (so a run never has more than a few dozen files), key
by key, and into one at finish.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from expman._storage.rows import frame_table
from expman._wire.frames import decode_frame
from expman._storage.layout import METRICS_DIR, WAL_DIR, Part, list_parts, metrics_schema, part_name, stale_parts
from expman._storage.wal import SegmentWriter, list_segments, read_records, segment_path

from ._parts import merge_parts, next_merge, write_part

log = logging.getLogger("expman.collector")

# Dictionary-encode only columns with few distinct values (a frame's points share a time);
# doing it for values and steps costs more than it saves.
_ENCODING = {"use_dictionary": ["key", "text", "rank", "host", "time"],
             "column_encoding": {"step": "DELTA_BINARY_PACKED"}}
_SCHEMA = metrics_schema()


FRAMES_KEY = "expman.frames"  # part metadata: {sender: [[lo, hi], ...]} of the frames it holds
Ranges = dict[str, list[list[int]]]


def _to_ranges(frames: list[tuple[str, int]]) -> Ranges:
    """Compress (sender, seq) pairs into sorted, merged [lo, hi] ranges per sender."""
    return _union([{sender: [[seq, seq]]} for sender, seq in frames])


def _union(parts: list[Ranges]) -> Ranges:
    out: Ranges = {}
    for ranges in parts:
        for sender, items in ranges.items():
            out.setdefault(sender, []).extend([list(r) for r in items])
    for sender, items in out.items():
        items.sort()
        merged: list[list[int]] = []
        for lo, hi in items:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out[sender] = merged
    return out


def part_frames(path: Path) -> Ranges:
    """The frames (by sender and seq) whose rows a part holds, from its metadata."""
    try:
        raw = (pq.read_schema(path).metadata or {}).get(FRAMES_KEY.encode())
    except FileNotFoundError:
        return {}
    return json.loads(raw) if raw else {}


def _frames_metadata(ranges: Ranges) -> dict[str, str]:
    return {FRAMES_KEY: json.dumps(ranges, separators=(",", ":"))}


class MetricsStore:
    """One writer's (collector's) share of a run's metrics."""

    def __init__(self, run_dir: Path, writer: str) -> None:
        self.writer = writer
        self.metrics_dir = run_dir / METRICS_DIR
        self.wal_dir = run_dir / WAL_DIR / writer
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self._tables: list[pa.Table] = []
        self.pending_rows = 0
        self.rows_written = 0
        # Every frame this writer has stored for the run, so a restarted collector does not
        # store a resend twice (also ones whose ack a kill lost after they reached a part).
        self.stored_frames: Ranges = {}
        self._frames: list[tuple[str, int]] = []  # added since the last flush
        self._recover()

    def _recover(self) -> None:
        """Finish whatever a previous collector left: stale parts, unflushed segments."""
        for path in stale_parts(self.metrics_dir, self.writer):
            path.unlink(missing_ok=True)
        for tmp in self.metrics_dir.glob(f".*.{self.writer}.parquet.tmp"):
            tmp.unlink(missing_ok=True)
        parts = list_parts(self.metrics_dir, self.writer)
        covered = max((p.last for p in parts), default=-1)
        segments = list_segments(self.wal_dir)
        leftover = [(n, path) for n, path in segments if n > covered]
        for n, path in segments:
            if n <= covered:
                path.unlink(missing_ok=True)
        next_segment = max([covered] + [n for n, _ in segments]) + 1
        self.stored_frames = _union([part_frames(p.path) for p in parts])
        if leftover:
            frames = [decode_frame(rec) for _, path in leftover for rec in read_records(path)]
            recovered = _to_ranges([(f.sender, f.seq) for f in frames if f.seq is not None])
            self.stored_frames = _union([self.stored_frames, recovered])
            if frames:
                table = pa.concat_tables([frame_table(f) for f in frames])
                write_part(table, self.metrics_dir / part_name(0, leftover[0][0], leftover[-1][0], self.writer), _SCHEMA,
                           _frames_metadata(recovered), by_key=True, **_ENCODING)
                log.warning("recovered %d points from %d write-ahead segments in %s",
                            table.num_rows, len(leftover), self.wal_dir.parent)
            for _, path in leftover:
                path.unlink(missing_ok=True)
        self.wal = SegmentWriter(self.wal_dir, next_segment)
        self._pending_from = next_segment
        self._synced_tables = 0
        self.rollbacks = 0  # failed syncs: frames added before one were not stored

    def add(self, raw_frame: bytes, table: pa.Table, sender: str, seq: int | None) -> None:
        """Log the frame ahead; its rows go to Parquet at the next flush."""
        self.wal.append(raw_frame)
        self._tables.append(table)
        self._frames.append((sender, -1 if seq is None else seq))
        self.pending_rows += table.num_rows

    def sync(self) -> None:
        """Make the frames added since the last sync durable; if that fails (disk full)
        forget them, so their resends are stored once, and raise."""
        try:
            self.wal.sync()
        except OSError:
            self.rollbacks += 1
            del self._tables[self._synced_tables:]
            del self._frames[self._synced_tables:]
            self.pending_rows = sum(t.num_rows for t in self._tables)
            raise
        self._synced_tables = len(self._tables)

    def flush(self) -> None:
        """Seal the current segment and write its rows as a part."""
        if not self._tables:
            return
        sealed = self.wal.rotate()
        table = pa.concat_tables(self._tables)
        frames = _to_ranges([f for f in self._frames if f[1] >= 0])
        write_part(table, self.metrics_dir / part_name(0, self._pending_from, sealed, self.writer), _SCHEMA,
                   _frames_metadata(frames), by_key=True, **_ENCODING)
        self.stored_frames = _union([self.stored_frames, frames])
        for number in range(self._pending_from, sealed + 1):
            segment_path(self.wal_dir, number).unlink(missing_ok=True)
        self.rows_written += table.num_rows
        self._tables.clear()
        self._frames.clear()
        self._synced_tables = 0
        self.pending_rows = 0
        self._pending_from = self.wal.number
        self._merge_levels()

    def _merge_levels(self) -> None:
        while (plan := next_merge(list_parts(self.metrics_dir, self.writer))) is not None:
            self._merge(*plan)

    def _merge(self, parts: list[Part], level: int) -> None:
        frames = _frames_metadata(_union([part_frames(p.path) for p in parts]))
        merge_parts(parts, level, _SCHEMA, frames, summarize=True, by_key=True, **_ENCODING)

    def compact(self) -> None:
        """Flush, then merge every part into one (at finish)."""
        self.flush()
        parts = list_parts(self.metrics_dir, self.writer)
        if len(parts) > 1:
            self._merge(parts, max(p.level for p in parts) + 1)

    def close(self) -> None:
        self.wal.close()
        segment = segment_path(self.wal_dir, self.wal.number)
        if segment.exists() and segment.stat().st_size == 0:
            segment.unlink()
        for folder in (self.wal_dir, self.wal_dir.parent):
            try:
                folder.rmdir()
            except OSError:
                pass
