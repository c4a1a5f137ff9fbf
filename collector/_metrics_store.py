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
from array import array
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


def _add_seq(ranges: Ranges, sender: str, seq: int) -> None:
    """Add one seq to `ranges` (sorted, merged): at once where it extends the last range."""
    items = ranges.setdefault(sender, [])
    if items and items[-1][0] <= seq <= items[-1][1] + 1:
        items[-1][1] = max(items[-1][1], seq)
    elif not items or seq > items[-1][1]:
        items.append([seq, seq])
    else:
        ranges[sender] = _union([{sender: items}, {sender: [[seq, seq]]}])[sender]


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


class _Packed:
    """Small frames folded into growing columns, in arrival order: ~20 bytes a point and
    24 a frame, where a _Small each is a few Python objects (~600 bytes). A run's committed
    frames wait for their part like this, so a thousand slow runs can each keep a whole
    run's points until its finish (one part, no merge) in little memory."""

    __slots__ = ("codes", "hosts", "ids", "values", "steps", "ranks", "host_ids", "times", "counts", "num_rows",
                 "_names", "_mapping")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.hosts: dict[str, int] = {}
        self.ids, self.values, self.steps = bytearray(), bytearray(), bytearray()  # int32, float64, int64
        self.ranks, self.host_ids = array("i"), array("i")  # per frame
        self.times, self.counts = array("q"), array("q")
        self.num_rows = 0
        self._names: list[str] | None = None  # the last frame's keys, and its ids' mapping (None: as they are)
        self._mapping: np.ndarray | None = None

    def add(self, item: _Small) -> None:
        if item.names != self._names:
            mapping = [self.codes.setdefault(name, len(self.codes)) for name in item.names]
            self._names = item.names
            self._mapping = None if mapping == list(range(len(mapping))) else np.array(mapping, np.int32)
        self.ids += (item.ids if self._mapping is None else self._mapping[item.ids]).astype(np.int32, copy=False).data
        self.values += item.values
        self.steps += item.steps
        self.ranks.append(item.rank)
        self.host_ids.append(self.hosts.setdefault(item.host, len(self.hosts)))
        self.times.append(item.time_us)
        self.counts.append(len(item.ids))
        self.num_rows += len(item.ids)

    @property
    def frames(self) -> int:
        return len(self.counts)

    def extend(self, other: _Packed) -> None:
        """Append another packed run of frames (its key and host codes mapped to ours)."""
        keys = np.array([self.codes.setdefault(name, len(self.codes)) for name in other.codes], np.int32)
        hosts = np.array([self.hosts.setdefault(name, len(self.hosts)) for name in other.hosts], np.int32)
        if other.num_rows:
            self.ids += keys[np.frombuffer(other.ids, np.int32)].data
        self.values += other.values
        self.steps += other.steps
        self.ranks.extend(other.ranks)
        self.host_ids.frombytes(hosts[np.frombuffer(other.host_ids, np.int32)].tobytes() if other.frames else b"")
        self.times.extend(other.times)
        self.counts.extend(other.counts)
        self.num_rows += other.num_rows
        self._names = None

    @classmethod
    def joined(cls, items: list[_Small | _Packed]) -> _Packed:
        """The items' rows as one packed run (the item itself when there is one packed)."""
        if len(items) == 1 and isinstance(items[0], _Packed):
            return items[0]
        packed = cls()
        for item in items:
            if isinstance(item, _Packed):
                packed.extend(item)
            else:
                packed.add(item)
        return packed


    def table(self) -> pa.Table:
        """The rows as a table, built with numpy."""
        counts = np.frombuffer(self.counts, np.int64)
        return pa.Table.from_arrays([
            pa.DictionaryArray.from_arrays(pa.array(np.frombuffer(self.ids, np.int32), pa.int32()),
                                           _strings(list(self.codes))),
            pa.array(np.frombuffer(self.values, np.float64)),
            pa.nulls(self.num_rows, pa.string()),
            pa.array(np.frombuffer(self.steps, np.int64)),
            pa.array(np.repeat(np.frombuffer(self.ranks, np.int32), counts)),
            pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.frombuffer(self.host_ids, np.int32), counts)),
                                           pa.array(list(self.hosts), pa.string())),
            pa.array(np.repeat(np.frombuffer(self.times, np.int64), counts)).cast(_TIME_TYPE),
        ], schema=_SCHEMA)


def _keyed_rows(items: list[_Small | _Packed]) -> KeyedRows:
    """Small frames' rows in key order (a stable order: each key keeps its arrival order),
    made a row group at a time from their packed columns. The order comes from ranking the
    few key names; rows that arrive in key order already (a log_metric loop, or each key in
    its own frames) are sliced as they are, and only interleaved keys are gathered. Never a
    table of the whole part, nor a sorted copy. `items` is emptied: the rows belong to the
    row groups now."""
    packed = _Packed.joined(items)
    items.clear()
    n = packed.num_rows
    counts = np.frombuffer(packed.counts, np.int64)
    frame_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    ranks = np.frombuffer(packed.ranks, np.int32)
    host_of = np.frombuffer(packed.host_ids, np.int32)
    times = np.frombuffer(packed.times, np.int64)
    values = np.frombuffer(packed.values, np.float64)
    steps = np.frombuffer(packed.steps, np.int64)
    # Sorted in Arrow, without the GIL (UTF-8 byte order is str order): a key's position
    # among the sorted names is the dictionary code its rows are written with.
    names = _strings(list(packed.codes))
    order_of_name = pc.array_sort_indices(names).to_numpy()
    position = np.empty(len(names), np.int32)
    position[order_of_name] = np.arange(len(names), dtype=np.int32)
    key = position[np.frombuffer(packed.ids, np.int32)] if len(names) > 1 else np.zeros(n, np.int32)
    per_key = np.bincount(key, minlength=len(names)) if len(names) > 1 else np.array([n] * len(names), np.int64)
    in_order = len(names) <= 1 or bool((np.diff(key) >= 0).all())
    dictionary = names.take(pa.array(order_of_name))
    host_names = pa.array(list(packed.hosts), pa.string())

    def groups() -> Iterator[pa.Table]:
        order = None if in_order else np.argsort(key, kind="stable")
        for start in range(0, n, ROW_GROUP):
            rows = slice(start, min(n, start + ROW_GROUP)) if order is None else order[start:start + ROW_GROUP]
            frame = frame_of[rows]
            m = len(frame)
            yield pa.Table.from_arrays([
                pa.DictionaryArray.from_arrays(pa.array(key[rows]), dictionary), pa.array(values[rows]),
                pa.nulls(m, pa.string()), pa.array(steps[rows]), pa.array(ranks[frame]),
                pa.DictionaryArray.from_arrays(pa.array(host_of[frame]), host_names),
                pa.Array.from_buffers(_TIME_TYPE, m, [None, pa.py_buffer(times[frame])]),
            ], schema=_SCHEMA)

    present = np.flatnonzero(per_key)
    first = (np.cumsum(per_key) - per_key)[present].tolist()
    rows_of = per_key[present].tolist()
    index: dict[str, tuple[int, int]] = {}
    for i in range(0, len(present), _GIL_CHUNK):  # in pieces: each call holds the GIL
        chunk = dictionary.take(pa.array(present[i:i + _GIL_CHUNK])).to_pylist()
        index.update(zip(chunk, zip(first[i:i + _GIL_CHUNK], rows_of[i:i + _GIL_CHUNK])))
    return KeyedRows(groups(), index)


def _pending_table(items: list[_Small | _Packed | pa.Table]) -> pa.Table:
    """The rows of pending frames in arrival order (runs of small frames built together)."""
    tables: list[pa.Table] = []
    run: list[_Small | _Packed] = []
    for item in items:
        if not isinstance(item, pa.Table):
            run.append(item)
            continue
        if run:
            tables.append(_Packed.joined(run).table())
            run = []
        tables.append(item)
    if run:
        tables.append(_Packed.joined(run).table())
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class _Batch:
    """Rows sealed in WAL segments [first, last], on their way to a part."""

    __slots__ = ("items", "frames", "first", "last", "summarize")

    def __init__(self, items: list[_Small | _Packed | pa.Table], frames: Ranges, first: int, last: int,
                 summarize: bool) -> None:
        self.items, self.frames, self.first, self.last = items, frames, first, last
        self.summarize = summarize  # a run's last part: it may stay its only one


_INLINE = Background(threads=None)  # stores built without a background (tests, tools) write at once


class MetricsStore:
    """One writer's (collector's) share of a run's metrics."""

    def __init__(self, run_dir: Path, writer: str, background: Background | None = None) -> None:
        self.writer = writer
        self.background = background or _INLINE
        self.metrics_dir = run_dir / METRICS_DIR
        self.wal_dir = run_dir / WAL_DIR / writer
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self._tables: list[_Small | pa.Table] = []  # frames added since the last commit
        # Committed frames waiting for the next part: small ones packed, others as tables;
        # the (sender, seq) of all of them as ranges.
        self._held: list[_Packed | pa.Table] = []
        self._held_frames = 0
        self._held_ranges: Ranges = {}
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
        if not self._tables and not self._held:
            self.pending_since = time.monotonic()
        self._tables.append(table)
        self._frames.append((sender, -1 if seq is None else seq))
        self.pending_rows += table.num_rows
        self.compacted = False

    @property
    def pending_frames(self) -> int:
        """Frames whose rows wait for the next part."""
        return self._held_frames + len(self._tables)

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
        """The frames written so far are durable: they join the packed ones; PART_ROWS of
        them waiting become a part at once (the receive loop's look at its runs may come
        late when it is behind)."""
        for item, (sender, seq) in zip(self._tables, self._frames):
            if isinstance(item, _Small):
                if not self._held or not isinstance(self._held[-1], _Packed):
                    self._held.append(_Packed())
                self._held[-1].add(item)  # type: ignore[union-attr]
            else:
                self._held.append(item)
            if seq >= 0:
                _add_seq(self._held_ranges, sender, seq)
        self._held_frames += len(self._tables)
        self._tables.clear()
        self._frames.clear()
        self._synced_tables = 0
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
        self.pending_rows = sum(t.num_rows for t in self._held) + sum(t.num_rows for t in self._tables)

    def flush(self, written: threading.Event | None = None, last: bool = False) -> None:
        """Seal the current segment; the background writes its rows as a part, then
        deletes the sealed segments and merges what is due. `written` is set once every
        row added so far is in a part (a finish is answered then); `last`: the run has
        ended, so this part may stay its only one (it gets a chart summary)."""
        batch = None
        if self._tables or self._held:
            sealed = self.wal.rotate()
            frames = _union([self._held_ranges, _to_ranges([f for f in self._frames if f[1] >= 0])])
            batch = _Batch([*self._held, *self._tables], frames, self._pending_from, sealed, last)
            self.stored_frames = _union([self.stored_frames, frames])  # in sealed segments until the part is written
            self._tables.clear()
            self._frames.clear()
            self._held = []
            self._held_frames = 0
            self._held_ranges = {}
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
        if not batch.summarize and not any(isinstance(item, pa.Table) for item in batch.items):
            source: pa.Table | KeyedRows = _keyed_rows(batch.items)  # type: ignore[arg-type]
        else:  # frames of the general path among them (texts, times), or a run's last part (summarized)
            source = _pending_table(batch.items)
        rows = write_part(source, path, _SCHEMA, _frames_metadata(batch.frames), summarize=batch.summarize,
                          by_key=True, compression=FRESH_COMPRESSION, **_ENCODING)
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
        self.flush(last=True)
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
