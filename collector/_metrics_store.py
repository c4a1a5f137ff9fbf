"""One run's metrics on disk: write-ahead segments first, then Parquet parts.

Frames are appended to the current WAL segment before they are acknowledged. Every
flush seals the segment and writes its rows as a new part; parts are merged eight at a
time (so a run never has more than a few dozen files) and into one at finish.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from expman._columns import frame_table
from expman._protocol import decode_frame
from expman._schema import METRICS_DIR, WAL_DIR, Part, list_parts, metrics_schema, part_name, stale_parts
from expman._wal import SegmentWriter, list_segments, read_records, segment_path

from ._parts import write_part

log = logging.getLogger("expman.collector")

MERGE_FANIN = 8
# Dictionary-encode only columns with few distinct values (a frame's points share a time);
# doing it for values and steps costs more than it saves.
_ENCODING = {"use_dictionary": ["key", "text", "rank", "host", "time"],
             "column_encoding": {"step": "DELTA_BINARY_PACKED"}}
_SCHEMA = metrics_schema()


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
        self.recovered_frames: list[tuple[str, int]] = []  # (sender, seq) replayed from the WAL
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
        if leftover:
            frames = [decode_frame(rec) for _, path in leftover for rec in read_records(path)]
            self.recovered_frames = [(f.sender, f.seq) for f in frames if f.seq is not None]
            if frames:
                table = pa.concat_tables([frame_table(f) for f in frames])
                write_part(table, self.metrics_dir / part_name(0, leftover[0][0], leftover[-1][0], self.writer), _SCHEMA, **_ENCODING)
                log.warning("recovered %d points from %d write-ahead segments in %s",
                            table.num_rows, len(leftover), self.wal_dir.parent)
            for _, path in leftover:
                path.unlink(missing_ok=True)
        self.wal = SegmentWriter(self.wal_dir, next_segment)
        self._pending_from = next_segment

    def add(self, raw_frame: bytes, table: pa.Table) -> None:
        """Log the frame ahead; its rows go to Parquet at the next flush."""
        self.wal.append(raw_frame)
        self._tables.append(table)
        self.pending_rows += table.num_rows

    def sync(self) -> None:
        self.wal.sync()

    def flush(self) -> None:
        """Seal the current segment and write its rows as a part."""
        if not self._tables:
            return
        sealed = self.wal.rotate()
        table = pa.concat_tables(self._tables)
        write_part(table, self.metrics_dir / part_name(0, self._pending_from, sealed, self.writer), _SCHEMA, **_ENCODING)
        for number in range(self._pending_from, sealed + 1):
            segment_path(self.wal_dir, number).unlink(missing_ok=True)
        self.rows_written += table.num_rows
        self._tables.clear()
        self.pending_rows = 0
        self._pending_from = self.wal.number
        self._merge_levels()

    def _merge_levels(self) -> None:
        while True:
            parts = list_parts(self.metrics_dir, self.writer)
            by_level: dict[int, list[Part]] = {}
            for p in parts:
                by_level.setdefault(p.level, []).append(p)
            full = next((lvl for lvl, group in sorted(by_level.items()) if len(group) >= MERGE_FANIN), None)
            if full is None:
                return
            self._merge(by_level[full][:MERGE_FANIN], full + 1)

    def _merge(self, parts: list[Part], level: int) -> None:
        target = self.metrics_dir / part_name(level, parts[0].first, parts[-1].last, self.writer)
        write_part(parts, target, _SCHEMA, **_ENCODING)
        for p in parts:
            p.path.unlink(missing_ok=True)

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
