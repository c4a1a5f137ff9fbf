"""A run's metrics as they stand: Parquet parts per writer, then write-ahead records not yet in a part.

The one owner of reading a live run; `Run.metrics()` and expman-tui both go through it.
The collector keeps flushing and merging while we read, so a read is a consistent
snapshot taken in three quick steps: list the parts (and, for a one-shot read, open them:
an open part stays readable after a merge deletes it), read each writer's write-ahead
segments past its parts, then list the parts again. Only if a writer's new part covers a
segment we did not hold to the end do we look again; that window is a few milliseconds,
so a reader of a run of any size settles, however long reading the parts then takes.

`MetricsTail` keeps what it read between polls (the TUI calls `poll()` every refresh):
each segment is decoded once, then only the records appended since.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING

from expman._errors import ExpmanError
from expman._storage.files import LOCAL, ArrowFiles, Files
from expman._storage.key_index import KeyIndex, read_index
from expman._storage.layout import METRICS_DIR, WAL_DIR, Part, list_parts
from expman._storage.wal import RECORD_OVERHEAD, list_segments, read_records

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

ATTEMPTS = 200  # each look takes milliseconds and a collector flushes every 0.5 s: never reached in practice


def open_part(files: Files, path: PurePath) -> pq.ParquetFile:
    """An open Parquet part (FileNotFoundError if it was merged away before we got to it)."""
    import pyarrow.parquet as pq

    if isinstance(files, ArrowFiles):
        return pq.ParquetFile(files.filesystem.open_input_file(str(path)))
    return pq.ParquetFile(str(path))


@dataclass
class _Segment:
    offset: int = 0  # bytes decoded so far (a record boundary)
    tables: list = field(default_factory=list)  # their rows, one table per record


class MetricsTail:
    """The parts of a run's metrics and the rows not yet in any part, kept up to date by `poll()`.

    `parts` are the current parts (oldest first per writer); with `open_parts`, `opened`
    holds them open, so a snapshot reads whole even if the collector merges meanwhile.
    `tail` is every write-ahead row past the parts, `appended` the rows the last poll added.
    """

    def __init__(self, run_dir: PurePath, files: Files = LOCAL, *, open_parts: bool = False) -> None:
        self.run_dir, self.files, self.open_parts = run_dir, files, open_parts
        self.parts: list[Part] = []
        self.opened: dict[PurePath, pq.ParquetFile] = {}
        self.tail: pa.Table | None = None
        self.appended: pa.Table | None = None
        self._segments: dict[PurePath, _Segment] = {}
        self._indexes: dict[PurePath, KeyIndex | None] = {}

    def key_index(self, path: PurePath) -> KeyIndex | None:
        """The key index of an opened part (read from its footer once)."""
        if path not in self._indexes:
            self._indexes[path] = read_index(self.opened[path])
        return self._indexes[path]

    def poll(self) -> bool:
        """Take a consistent look; True when the parts or the tail changed since the last one."""
        folder = self.run_dir / METRICS_DIR
        for attempt in range(ATTEMPTS):
            parts = list_parts(folder, files=self.files)
            try:
                opened = self._open(parts)
            except FileNotFoundError:  # merged away between listing and opening
                continue
            covered = _coverage(parts)
            segments, held, new_tables = self._read_segments(covered)
            if _settled(list_parts(folder, files=self.files), covered, held):
                break
            time.sleep(min(0.001 * attempt, 0.05))
        else:
            raise ExpmanError(f"{self.files.uri(folder)}: the collector kept rewriting parts while they were read")
        changed = parts != self.parts or bool(new_tables) or set(segments) != set(self._segments)
        self.parts, self.opened, self._segments = parts, opened, segments
        self._indexes = {p: i for p, i in self._indexes.items() if p in opened}
        if changed:
            import pyarrow as pa

            tables = [t for s in segments.values() for t in s.tables]
            self.tail = pa.concat_tables(tables) if tables else None
        self.appended = _concat(new_tables)
        return changed

    def _open(self, parts: list[Part]) -> dict[PurePath, pq.ParquetFile]:
        if not self.open_parts:
            return {}
        return {p.path: self.opened[p.path] if p.path in self.opened else open_part(self.files, p.path) for p in parts}

    def _read_segments(self, covered: dict[str, int]) -> tuple[dict[PurePath, _Segment], dict[str, set[int]], list]:
        """Each writer's segments past its parts, decoded from where the last poll stopped.
        `held`: the segments still there after reading (so read to their end as of now)."""
        from expman._storage.rows import frame_table
        from expman._wire.frames import decode_frame

        wal = self.run_dir / WAL_DIR
        segments: dict[PurePath, _Segment] = {}
        held: dict[str, set[int]] = {}
        new_tables = []
        for writer in sorted(n for n in self.files.dirs(wal) if not n.startswith(".")):
            for number, path in list_segments(wal / writer, self.files):
                if number <= covered.get(writer, -1):
                    continue
                before = self._segments.get(path, _Segment())
                seen = _Segment(before.offset, list(before.tables))
                for record in read_records(path, self.files, start=seen.offset):
                    table = frame_table(decode_frame(record))
                    seen.tables.append(table)
                    new_tables.append(table)
                    seen.offset += RECORD_OVERHEAD + len(record)
                segments[path] = seen
                if self.files.is_file(path):
                    held.setdefault(writer, set()).add(number)
        return segments, held, new_tables


def _coverage(parts: list[Part]) -> dict[str, int]:
    """Per writer, the last write-ahead segment its parts hold."""
    covered: dict[str, int] = {}
    for part in parts:
        covered[part.writer] = max(covered.get(part.writer, -1), part.last)
    return covered


def _settled(after: list[Part], covered: dict[str, int], held: dict[str, set[int]]) -> bool:
    """Whether the look was consistent: every segment that a part listed after reading holds,
    beyond the parts we read, is one we held (else its rows may be in neither)."""
    for part in after:
        start = covered.get(part.writer, -1) + 1
        if part.last >= start and not set(range(max(start, part.first), part.last + 1)) <= held.get(part.writer, set()):
            return False
    return True


def _concat(tables: list) -> pa.Table | None:
    if not tables:
        return None
    import pyarrow as pa

    return pa.concat_tables(tables)


def snapshot(run_dir: PurePath, files: Files = LOCAL) -> MetricsTail:
    """A one-shot consistent look at a run's metrics, its parts held open."""
    tail = MetricsTail(run_dir, files, open_parts=True)
    tail.poll()
    return tail
