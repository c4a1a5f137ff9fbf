"""One run's metrics on disk: write-ahead segments first, then Parquet parts.

Frames are appended to the current WAL segment before they are acknowledged. Every
flush seals the segment and hands its rows to the background (collector/_background.py),
which writes them as a new part, sorted by key with a key index in its footer
(expman/_storage/key_index.py: a reader of one key decodes only that key), then deletes
the sealed segments; fresh parts are merged eight at a time, key by key, and into one at
finish (collector/_parts.py `next_merge` says which). The receive loop only seals and
hands over: the sorting, encoding and merging of a run with a million keys never delays
another run's acknowledgements. A crash at any moment leaves the segments of a part not
yet written, or a wider part beside the inputs it covers: the next collector recovers the
one and deletes the others, so no point is lost or counted twice.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from expman._errors import ProtocolError
from expman._storage.rows import frame_table
from expman._wire.columns import read_metrics_body
from expman._wire.frames import Frame, decode_frame
from expman._storage.layout import METRICS_DIR, WAL_DIR, Part, list_parts, metrics_schema, part_name, stale_parts
from expman._storage.wal import SegmentWriter, list_segments, read_records, segment_path

from ._background import Background
from ._parts import FRESH_COMPRESSION, ROW_GROUP, KeyedRows, merge_parts, next_merge, write_part

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


_TIME_TYPE = _SCHEMA.field("time").type
PART_ROWS = 262_144  # rows waiting that make a part as soon as they are durable: bounds a part's memory
_SMALL_MAX_KEY_ID = 1 << 20  # key ids past this (or below 0) take the general path: no huge lookup table


class _Small:
    """A plain metrics frame (binary steps, the frame's time, no texts) kept as its raw
    columns until the next part: building an Arrow table per frame costs ~90 us, which
    at one or two points per frame (many slow runs) is most of the collector's work."""

    __slots__ = ("names", "ids", "values", "steps", "rank", "host", "time_us")

    def __init__(self, names: list[str], ids: np.ndarray, values: bytes, steps: bytes,
                 rank: int, host: str, time_us: int) -> None:
        self.names, self.ids, self.values, self.steps = names, ids, values, steps
        self.rank, self.host, self.time_us = rank, host, time_us

    @property
    def num_rows(self) -> int:
        return len(self.ids)


def _small(frame: Frame) -> tuple[_Small | pa.Table, int | None]:
    """The frame's rows (a _Small where it can, else a table) and its highest step;
    raises ProtocolError for what batch_table would refuse."""
    batch = read_metrics_body(frame.body)
    known = sorted(batch.keys)
    time_us = int(frame.sent_at * 1e6) if math.isfinite(frame.sent_at) else 2**63
    if (batch.texts or batch.times is not None or not isinstance(batch.steps, bytes)
            or (known and not 0 <= known[0] <= known[-1] < _SMALL_MAX_KEY_ID) or not -2**63 <= time_us < 2**63):
        table = frame_table(frame)  # the general path, and the one that says what is wrong
        return table, pc.max(table.column("step")).as_py()
    ids = np.frombuffer(batch.ids, np.int32)
    if known != list(range(len(known))):
        lookup = np.full(max(known[-1] + 1, 1) if known else 1, -1, np.int32)
        lookup[known] = np.arange(len(known), dtype=np.int32)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(lookup)):
            raise ProtocolError("bad-values", "a point names a key id the frame does not define")
        ids = lookup[ids]
    if len(ids) and (ids.min() < 0 or ids.max() >= len(known)):
        raise ProtocolError("bad-values", "a point names a key id the frame does not define")
    steps = np.frombuffer(batch.steps, np.int64)
    rows = _Small([batch.keys[i] for i in known], ids, batch.values, batch.steps, frame.rank, frame.host, time_us)
    return rows, int(steps.max()) if len(steps) else None


_GIL_CHUNK = 50_000  # Python objects converted per call: each call holds the GIL, the receive loop waits


def _strings(names: list[str]) -> pa.Array:
    """`names` as an Arrow string array, converted in pieces (a million names in one call
    would hold the GIL for ~0.4 s; background threads run beside the receive loop)."""
    if len(names) <= _GIL_CHUNK:
        return pa.array(names, pa.string())
    return pa.concat_arrays([pa.array(names[i:i + _GIL_CHUNK], pa.string()) for i in range(0, len(names), _GIL_CHUNK)])


def _small_table(items: list[_Small]) -> pa.Table:
    """One table for many small frames, built with numpy."""
    codes: dict[str, int] = {}
    hosts: dict[str, int] = {}
    ids = []
    for item in items:
        mapping = np.array([codes.setdefault(name, len(codes)) for name in item.names], np.int32)
        ids.append(mapping[item.ids] if len(mapping) else item.ids)
    counts = np.fromiter((len(i.ids) for i in items), np.int64, len(items))
    n = int(counts.sum())
    return pa.Table.from_arrays([
        pa.DictionaryArray.from_arrays(pa.array(np.concatenate(ids), pa.int32()), _strings(list(codes))),
        pa.array(np.frombuffer(b"".join(i.values for i in items), np.float64)),
        pa.nulls(n, pa.string()),
        pa.array(np.frombuffer(b"".join(i.steps for i in items), np.int64)),
        pa.array(np.repeat(np.fromiter((i.rank for i in items), np.int32, len(items)), counts)),
        pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.fromiter((hosts.setdefault(i.host, len(hosts)) for i in items), np.int32,
                                           len(items)), counts)), pa.array(list(hosts), pa.string())),
        pa.array(np.repeat(np.fromiter((i.time_us for i in items), np.int64, len(items)), counts)).cast(_TIME_TYPE),
    ], schema=_SCHEMA)


def _keyed_rows(items: list[_Small]) -> KeyedRows:
    """Small frames' rows in key order (a stable order: each key keeps its arrival order),
    made a row group at a time. The order comes from ranking the few key names; rows that
    arrive in key order already (a log_metric loop, or each key in its own frames) are
    written straight from the frames' buffers, and only interleaved keys are gathered from
    joined columns (20 bytes a row). Never a table of the whole part, nor a sorted copy.
    `items` is emptied: the rows belong to the row groups now."""
    frames = list(items)
    items.clear()
    codes: dict[str, int] = {}
    hosts: dict[str, int] = {}
    ids = []
    for item in frames:
        mapping = np.array([codes.setdefault(name, len(codes)) for name in item.names], np.int32)
        ids.append(mapping[item.ids] if len(mapping) else item.ids)
    counts = np.fromiter((len(i.ids) for i in frames), np.int64, len(frames))
    starts = np.cumsum(counts) - counts
    n = int(counts.sum())
    ranks = np.fromiter((i.rank for i in frames), np.int32, len(frames))
    host_of = np.fromiter((hosts.setdefault(i.host, len(hosts)) for i in frames), np.int32, len(frames))
    times = np.fromiter((i.time_us for i in frames), np.int64, len(frames))
    # Sorted in Arrow, without the GIL (UTF-8 byte order is str order): a key's position
    # among the sorted names is the dictionary code its rows are written with.
    names = _strings(list(codes))
    order_of_name = pc.array_sort_indices(names).to_numpy()
    position = np.empty(len(codes), np.int32)
    position[order_of_name] = np.arange(len(codes), dtype=np.int32)
    key = position[np.concatenate(ids)] if len(codes) > 1 else np.zeros(n, np.int32)
    del ids
    per_key = np.bincount(key, minlength=len(codes)) if len(codes) > 1 else np.array([n] * len(codes), np.int64)
    in_order = len(codes) <= 1 or bool((np.diff(key) >= 0).all())
    dictionary = names.take(pa.array(order_of_name))
    host_names = pa.array(list(hosts), pa.string())

    def table(rows: np.ndarray | slice, frame: np.ndarray, values: pa.Array | pa.ChunkedArray,
              steps: pa.Array | pa.ChunkedArray) -> pa.Table:
        m = len(frame)
        return pa.Table.from_arrays([
            pa.DictionaryArray.from_arrays(pa.array(key[rows]), dictionary), values, pa.nulls(m, pa.string()), steps,
            pa.array(ranks[frame]), pa.DictionaryArray.from_arrays(pa.array(host_of[frame]), host_names),
            pa.Array.from_buffers(_TIME_TYPE, m, [None, pa.py_buffer(times[frame])]),
        ], schema=_SCHEMA)

    def in_arrival_order() -> Iterator[pa.Table]:
        for start in range(0, n, ROW_GROUP):
            stop = min(n, start + ROW_GROUP)
            first, last = np.searchsorted(starts, [start, stop], side="right") - 1
            values, steps, taken, lengths = [], [], [], []
            for i in range(first, min(last + 1, len(frames))):
                a, b = max(start - starts[i], 0), min(stop - starts[i], counts[i])
                if b > a:
                    values.append(pa.array(np.frombuffer(frames[i].values, np.float64)[a:b]))
                    steps.append(pa.array(np.frombuffer(frames[i].steps, np.int64)[a:b]))
                    taken.append(i)
                    lengths.append(b - a)
                if starts[i] + counts[i] <= stop:
                    frames[i] = None  # type: ignore[call-overload]  # written: let it go
            frame = np.repeat(np.array(taken, np.int64), lengths)
            yield table(slice(start, stop), frame, pa.chunked_array(values, pa.float64()),
                        pa.chunked_array(steps, pa.int64()))

    def gathered() -> Iterator[pa.Table]:
        order = np.argsort(key, kind="stable")
        frame_of = np.repeat(np.arange(len(frames), dtype=np.int32), counts)
        values = np.frombuffer(b"".join(i.values for i in frames), np.float64)
        steps = np.frombuffer(b"".join(i.steps for i in frames), np.int64)
        frames.clear()
        for start in range(0, n, ROW_GROUP):
            rows = order[start:start + ROW_GROUP]
            yield table(rows, frame_of[rows], pa.array(values[rows]), pa.array(steps[rows]))

    present = np.flatnonzero(per_key)
    first = (np.cumsum(per_key) - per_key)[present].tolist()
    rows_of = per_key[present].tolist()
    index: dict[str, tuple[int, int]] = {}
    for i in range(0, len(present), _GIL_CHUNK):  # in pieces: each call holds the GIL
        chunk = dictionary.take(pa.array(present[i:i + _GIL_CHUNK])).to_pylist()
        index.update(zip(chunk, zip(first[i:i + _GIL_CHUNK], rows_of[i:i + _GIL_CHUNK])))
    return KeyedRows(in_arrival_order() if in_order else gathered(), index)


def _pending_table(items: list[_Small | pa.Table]) -> pa.Table:
    """The rows of pending frames in arrival order (runs of small frames built together)."""
    tables: list[pa.Table] = []
    run: list[_Small] = []
    for item in items:
        if isinstance(item, _Small):
            run.append(item)
            continue
        if run:
            tables.append(_small_table(run))
            run = []
        tables.append(item)
    if run:
        tables.append(_small_table(run))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class _Batch:
    """Rows sealed in WAL segments [first, last], on their way to a part."""

    __slots__ = ("items", "frames", "first", "last")

    def __init__(self, items: list[_Small | pa.Table], frames: Ranges, first: int, last: int) -> None:
        self.items, self.frames, self.first, self.last = items, frames, first, last


_INLINE = Background(threads=None)  # stores built without a background (tests, tools) write at once


class MetricsStore:
    """One writer's (collector's) share of a run's metrics."""

    def __init__(self, run_dir: Path, writer: str, background: Background | None = None) -> None:
        self.writer = writer
        self.background = background or _INLINE
        self.metrics_dir = run_dir / METRICS_DIR
        self.wal_dir = run_dir / WAL_DIR / writer
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self._tables: list[pa.Table] = []
        self.pending_rows = 0
        self.pending_since = 0.0  # monotonic time of the oldest row not yet in a part
        self.rows_written = 0  # by the background: rows put in fresh parts
        self._part_rows: dict[Path, int] = {}  # rows of the parts this store wrote (next_merge asks)
        # Two queues in the background: parts written in order (a finish waits for these
        # only), and merges (low priority), which never hold a write up; one merge at a time.
        self._writes, self._merges = (self, "writes"), (self, "merges")
        self._merging = threading.Lock()
        self.compacted = False  # every part merged into one since the last frame (finish)
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
        self._written_from: int | None = None  # WAL size before writes that wait for a group commit
        self.rollbacks = 0  # failed syncs: frames added before one were not stored

    def add_frame(self, raw_frame: bytes, frame: Frame) -> tuple[int, int | None]:
        """Check a metrics frame, log it ahead; returns (its rows, its highest step or None)."""
        rows, last = _small(frame)
        self.add(raw_frame, rows, frame.sender, frame.seq)
        return rows.num_rows, last

    def add(self, raw_frame: bytes, table: pa.Table | _Small, sender: str, seq: int | None) -> None:
        """Log the frame ahead; its rows go to Parquet at the next flush."""
        self.wal.append(raw_frame)
        if not self._tables:
            self.pending_since = time.monotonic()
        self._tables.append(table)
        self._frames.append((sender, -1 if seq is None else seq))
        self.pending_rows += table.num_rows
        self.compacted = False

    @property
    def pending_frames(self) -> int:
        """Frames whose rows wait for the next part (each holds a small table in memory)."""
        return len(self._tables)

    def sync(self, fsync: bool = True) -> None:
        """Make the frames added since the last sync durable; if that fails (disk full)
        forget them, so their resends are stored once, and raise. `fsync=False` only
        writes them: a group commit follows, then `committed()` or `commit_failed()`."""
        start = self.wal.committed
        try:
            self.wal.sync(fsync)
        except OSError:
            self.commit_failed()
            raise
        if fsync:
            self.committed()
        elif self._written_from is None:
            self._written_from = start

    def committed(self) -> None:
        """The frames written so far are durable; PART_ROWS of them waiting become a part at
        once (the receive loop's look at its runs may come late when it is behind)."""
        self._synced_tables = len(self._tables)
        self._written_from = None
        if self.pending_rows >= PART_ROWS:
            self.flush()

    def commit_failed(self) -> None:
        """The group commit failed: cut the WAL back to what was durable, forget the rest."""
        if self._written_from is not None:
            self.wal.truncate(self._written_from)
            self._written_from = None
        self.rollbacks += 1
        del self._tables[self._synced_tables:]
        del self._frames[self._synced_tables:]
        self.pending_rows = sum(t.num_rows for t in self._tables)

    def flush(self, written: threading.Event | None = None) -> None:
        """Seal the current segment; the background writes its rows as a part, then
        deletes the sealed segments and merges what is due. `written` is set once every
        row added so far is in a part (a finish is answered then)."""
        batch = None
        if self._tables:
            sealed = self.wal.rotate()
            frames = _to_ranges([f for f in self._frames if f[1] >= 0])
            batch = _Batch(list(self._tables), frames, self._pending_from, sealed)
            self.stored_frames = _union([self.stored_frames, frames])  # in sealed segments until the part is written
            self._tables.clear()
            self._frames.clear()
            self._synced_tables = 0
            self.pending_rows = 0
            self._pending_from = self.wal.number
            self.background.submit(self._writes, lambda: self._write_batch(batch))
        if written is not None:
            self.background.submit(self._writes, written.set)
        if batch is not None:
            self.background.submit(self._merges, self._merge_due, low_priority=True)

    def _merge_due(self) -> None:
        """Merge what is due (collector/_parts.py next_merge)."""
        with self._merging:
            while (plan := next_merge(list_parts(self.metrics_dir, self.writer), self._rows_of)) is not None:
                self._merge(*plan)

    def _write_batch(self, batch: _Batch) -> None:
        """Background: the batch as a part, then its segments deleted."""
        path = self.metrics_dir / part_name(0, batch.first, batch.last, self.writer)
        if all(isinstance(item, _Small) for item in batch.items):
            source: pa.Table | KeyedRows = _keyed_rows(batch.items)  # type: ignore[arg-type]
        else:  # frames of the general path among them (texts, times)
            source = _pending_table(batch.items)
        rows = write_part(source, path, _SCHEMA, _frames_metadata(batch.frames), by_key=True,
                          compression=FRESH_COMPRESSION, **_ENCODING)
        batch.items.clear()  # the rows live in the part now: free them before merging
        for number in range(batch.first, batch.last + 1):
            segment_path(self.wal_dir, number).unlink(missing_ok=True)
        self.rows_written += rows
        self._part_rows[path] = rows

    def _rows_of(self, part: Part) -> int:
        rows = self._part_rows.get(part.path)
        if rows is None:  # a part from before a restart
            rows = self._part_rows[part.path] = pq.read_metadata(part.path).num_rows
        return rows

    def _merge(self, parts: list[Part], level: int) -> int:
        frames = _frames_metadata(_union([part_frames(p.path) for p in parts]))
        rows = merge_parts(parts, level, _SCHEMA, frames, summarize=True, by_key=True,
                           stop=self.background.stopping, **_ENCODING)
        for p in parts:
            self._part_rows.pop(p.path, None)
        self._part_rows[self.metrics_dir / part_name(level, parts[0].first, parts[-1].last, self.writer)] = rows
        return rows

    @property
    def busy(self) -> bool:
        """Parts still being written or merged in the background."""
        return self.background.busy(self._writes) or self.background.busy(self._merges)

    def wait(self, timeout: float | None = None) -> bool:
        """Until the background has written and merged what was handed to it; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.background.wait(self._writes, timeout):
            return False
        return self.background.wait(self._merges, None if deadline is None else max(0.0, deadline - time.monotonic()))

    def compact(self) -> None:
        """Flush, then merge every part into one (at finish), in the background."""
        self.flush()
        self.compacted = True
        # After every write handed over so far, as a merge (low priority: nothing waits for it).
        self.background.submit(self._writes, lambda: self.background.submit(self._merges, self._merge_all,
                                                                              low_priority=True))

    def _merge_all(self) -> None:
        with self._merging:
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
