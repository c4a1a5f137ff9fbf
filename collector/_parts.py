"""Writing Parquet parts: the one way the collector puts a part on disk."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from expman._storage import key_index as _key_index
from expman._storage import summary as _summary
from expman._storage.layout import KEY, Part, part_name

from ._background import Stopped

ROW_GROUP = 131_072
MIN_GROUP = ROW_GROUP // 8  # a key that starts past this many buffered rows starts a row group
STREAM_BATCH = 16_384  # rows a by-key merge holds per input while it streams
CHUNK_ROWS = MIN_GROUP  # a by-key merge gathers whole small keys up to this many rows and orders them at once
MERGE_FANIN = 8  # parts of one level merged into one of the next
SETTLED_ROWS = 1 << 20  # a merged part this large is not merged again before finish
GIL_CHUNK = 50_000  # Python objects made per call: each call holds the GIL, and the receive loop waits for it
FRESH_COMPRESSION = "lz4"  # fresh parts: read once more by their merge, which writes zstd (a third of the CPU, ~15% larger)


@dataclass
class KeyedRows:
    """A part's rows already in key order, made a row group at a time as they are written:
    the part is never one table in memory, nor sorted as a copy of one."""

    groups: Iterator[pa.Table]  # row groups of at most ROW_GROUP rows, in key order
    index: _key_index.KeyIndex  # where each key's rows lie (what sort_by_key would say)


def next_merge(parts: list[Part], rows: Callable[[Part], int] | None = None) -> tuple[list[Part], int] | None:
    """The parts to merge next and the level of the result, or None when nothing is due.

    MERGE_FANIN consecutive parts of the lowest level that has them: fresh parts (level 0)
    always; merged ones only while smaller than SETTLED_ROWS (`rows` says; without it, any
    size). So a point of a busy run is written twice before finish (its fresh part, one
    merge) while a slow run's many small parts keep folding together. Only neighbours
    merge: a merged part's name covers the segments from its first input to its last, and
    a reader skips every part inside it."""
    ordered = sorted(parts, key=lambda p: p.first)
    levels = sorted({p.level for p in ordered})
    for level in levels:
        run: list[Part] = []
        for part in ordered:
            if part.level == level and (level == 0 or rows is None or rows(part) < SETTLED_ROWS):
                run.append(part)
                if len(run) == MERGE_FANIN:
                    return run, level + 1
            else:
                run = []
    return None


class _Stream:
    """One input of a by-key merge, read front to back in small batches; its reader is let
    go once its last row is taken (a merge of many parts would otherwise keep every
    finished input's buffers until it ends: ~5 MB each)."""

    def __init__(self, file: pq.ParquetFile) -> None:
        self._batches: Iterator[pa.RecordBatch] | None = file.iter_batches(batch_size=STREAM_BATCH)
        self._head: pa.RecordBatch | None = None
        self._left = file.metadata.num_rows

    def take(self, rows: int) -> list[pa.RecordBatch]:
        out = []
        while rows > 0:
            if self._head is None or self._head.num_rows == 0:
                assert self._batches is not None
                self._head = next(self._batches)
            piece = self._head.slice(0, rows)
            self._head = self._head.slice(piece.num_rows)
            out.append(piece)
            rows -= piece.num_rows
            self._left -= piece.num_rows
        if self._left <= 0 and self._batches is not None:
            self._batches.close()  # type: ignore[attr-defined]
            self._batches = self._head = None
        return out


class _GroupWriter:
    """Buffers batches into row groups of ROW_GROUP rows; a key that begins once MIN_GROUP
    rows are buffered begins a new group, so most groups hold few keys (statistics on
    `key` then skip the rest)."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer, self.rows, self._buffer, self._buffered = writer, 0, [], 0

    def add(self, batches: list[pa.RecordBatch]) -> None:
        self._buffer.extend(batches)
        self._buffered += sum(b.num_rows for b in batches)
        if self._buffered >= ROW_GROUP:
            table = pa.Table.from_batches(self._buffer)
            whole = self._buffered - self._buffered % ROW_GROUP
            self._write(table.slice(0, whole))
            rest = table.slice(whole)
            self._buffer, self._buffered = rest.to_batches(), rest.num_rows

    def key_boundary(self) -> None:
        if self._buffered >= MIN_GROUP:
            self.flush()

    def flush(self) -> None:
        if self._buffered:
            self._write(pa.Table.from_batches(self._buffer))
        self._buffer, self._buffered = [], 0

    def _write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=ROW_GROUP)
        self.rows += table.num_rows


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped("merge stopped: its inputs are untouched")


def _merge_into(writer: pq.ParquetWriter, files: list[pq.ParquetFile], summarize: bool,
                stop: threading.Event | None) -> tuple[int, _summary.Summary]:
    """Stream the parts' rows into `writer` (inputs without a key index); with
    `summarize`, also their summary (inputs that carry one lend it)."""
    rows = 0
    summary: _summary.Summary = {}
    width = _summary.merge_width(files) if summarize else None
    for file in files:
        known = _summary.read_summary(file) if summarize else None
        if known is not None:
            summary = _summary.merge([summary, known])
        for batch in file.iter_batches(batch_size=ROW_GROUP):
            _check(stop)
            writer.write_batch(batch, row_group_size=ROW_GROUP)
            rows += batch.num_rows
            if summarize and known is None:  # each point is bucketed once, here
                summary = _summary.merge([summary, _summary.summarize(pa.Table.from_batches([batch]), width=width)])
    return rows, summary


def _key_runs(file: pq.ParquetFile) -> tuple[pa.Array, np.ndarray] | None:
    """A key-sorted part's keys in order and each one's rows, from its `key` column; None
    when the part has no key index (so is not sorted by key). Read this way rather than
    from the index's JSON: parsing that for a million keys holds the GIL for seconds."""
    if _key_index.KEY_INDEX not in (file.metadata.metadata or {}):
        return None
    column = file.read(columns=[KEY]).column(KEY)
    if column.num_chunks == 0 or len(column) == 0:
        return pa.array([], pa.string()), np.zeros(0, np.int64)
    keys = column.unify_dictionaries().combine_chunks() if pa.types.is_dictionary(column.type) else \
        column.combine_chunks().dictionary_encode()
    codes = keys.indices.to_numpy(zero_copy_only=False)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(codes)) + 1))
    counts = np.diff(np.append(starts, len(codes)))
    return keys.dictionary.take(pa.array(codes[starts])), counts


class _KeyPlan:
    """Where each key's rows lie in every input of a by-key merge, as arrays over the
    union of their keys in key order: no Python loop per key."""

    def __init__(self, runs: list[tuple[pa.Array, np.ndarray]]) -> None:
        # Sorted and matched in Arrow, which lets go of the GIL: sorting a million names
        # in Python would hold it for seconds, and the receive loop with it.
        given = [names.cast(pa.string()) for names, _ in runs]
        union = pc.unique(pa.concat_arrays(given)) if given else pa.array([], pa.string())
        table = union.take(pc.array_sort_indices(union))
        self.names: list[str] = [name for i in range(0, len(table), GIL_CHUNK)  # in pieces: each call holds the GIL
                                 for name in table.slice(i, GIL_CHUNK).to_pylist()]
        self.total = np.zeros(len(self.names), np.int64)
        self.positions: list[np.ndarray] = []  # per input: where its keys sit in `names` (rising)
        self.before: list[np.ndarray] = []  # per input: its rows of the keys before each key (len(names) + 1)
        for names, (_, counts) in zip(given, runs):
            pos = pc.index_in(names, value_set=table).to_numpy(zero_copy_only=False).astype(np.int64)
            self.total[pos] += counts
            cum = np.zeros(len(self.names) + 1, np.int64)
            cum[pos + 1] = counts
            self.positions.append(pos)
            self.before.append(np.cumsum(cum))

    def groups(self) -> list[tuple[int, int]]:
        """Consecutive keys [a, b) of at most CHUNK_ROWS rows together; a larger key alone."""
        n = len(self.names)
        if n == 0:
            return []
        start = np.concatenate(([0], np.cumsum(self.total)[:-1]))
        cuts = np.flatnonzero(np.diff(start // CHUNK_ROWS)) + 1
        big = np.flatnonzero(self.total > CHUNK_ROWS)
        bounds = np.unique(np.concatenate(([0, n], cuts, big, big + 1)))
        bounds = bounds[bounds <= n]
        return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))

    def rows(self, source: int, a: int, b: int) -> int:
        """Rows of input `source` for keys [a, b)."""
        before = self.before[source]
        return int(before[b] - before[a])

    def key_of_rows(self, source: int, a: int, b: int) -> np.ndarray:
        """For input `source`'s rows of keys [a, b), each row's key (its position in `names`)."""
        pos = self.positions[source]
        lo, hi = np.searchsorted(pos, [a, b])
        keys = pos[lo:hi]
        counts = self.before[source][keys + 1] - self.before[source][keys]
        return np.repeat(keys, counts)

    def index(self) -> _key_index.KeyIndex:
        first = np.concatenate(([0], np.cumsum(self.total)[:-1])).tolist()
        total = self.total.tolist()
        index: _key_index.KeyIndex = {}
        for i in range(0, len(total), GIL_CHUNK):  # in pieces: one dict() of a million pairs holds the GIL
            index.update(zip(self.names[i:i + GIL_CHUNK], zip(first[i:i + GIL_CHUNK], total[i:i + GIL_CHUNK])))
        return index


def _merge_by_key(writer: pq.ParquetWriter, files: list[pq.ParquetFile], runs: list[tuple[pa.Array, np.ndarray]],
                  summarize: bool, stop: threading.Event | None) -> tuple[int, _summary.Summary, _key_index.KeyIndex]:
    """Merge parts sorted by key into one sorted by key: for each key, each input's rows of
    it in input order (so each key keeps its arrival order). Every input is one stream read
    once, front to back; keys are taken in groups of whole keys of about CHUNK_ROWS rows,
    ordered with one stable sort per group (a key larger than that streams alone), so the
    cost per key is a few array elements and memory stays flat whatever the fan-in or the
    number of keys. Summaries: inputs that carry one lend it, the others are summarized
    group by group; none is computed where it could not be kept (as many keys as points).
    """
    plan = _KeyPlan(runs)
    total_rows = int(plan.total.sum())
    if summarize and len(plan.names) * _summary.KEEP_RATIO > total_rows:
        summarize = False  # at least a bucket per key: never worth keeping
    streams = [_Stream(file) for file in files]
    lent = [_summary.read_summary(file) if summarize else None for file in files]
    width = _summary.merge_width(files) if summarize else None
    out = _GroupWriter(writer)
    per_key: _summary.Summary = {}
    for a, b in plan.groups():
        _check(stop)
        out.key_boundary()
        names = plan.names[a:b]
        summaries: list[_summary.Summary] = []  # of this group, in input order
        if b - a == 1:  # one key, maybe millions of rows: streamed input after input, a batch at a time
            for source, stream in enumerate(streams):
                left = plan.rows(source, a, b)
                if left and lent[source] is not None:
                    summaries.append({k: lent[source][k] for k in names if k in lent[source]})
                while left:
                    _check(stop)
                    batches = stream.take(min(left, ROW_GROUP))
                    left -= sum(batch.num_rows for batch in batches)
                    out.add(batches)
                    if summarize and lent[source] is None:
                        summaries.append(_summary.summarize(pa.Table.from_batches(batches), width=width))
        else:  # whole keys of at most CHUNK_ROWS rows together: one stable sort puts them in key order
            pieces = [(source, stream.take(n)) for source, stream in enumerate(streams) if (n := plan.rows(source, a, b))]
            if len(pieces) == 1:
                out.add(pieces[0][1])
            else:
                order = np.argsort(np.concatenate([plan.key_of_rows(source, a, b) for source, _ in pieces]),
                                   kind="stable")
                table = pa.Table.from_batches([batch for _, piece in pieces for batch in piece])
                out.add(table.take(pa.array(order)).to_batches())
            if summarize:
                for source, batches in pieces:
                    known = lent[source]
                    summaries.append({k: known[k] for k in names if k in known} if known is not None
                                     else _summary.summarize(pa.Table.from_batches(batches), width=width))
        if summaries:
            per_key.update(_summary.merge(summaries) if len(summaries) > 1 else summaries[0])
    out.flush()
    summary = _summary.merge([per_key]) if per_key else {}
    return out.rows, summary, plan.index()


def write_part(
    source: pa.Table | KeyedRows | list[Part], target: Path, schema: pa.Schema, metadata: dict[str, str] | None = None,
    summarize: bool = False, by_key: bool = False, stop: threading.Event | None = None, compression: str = "zstd",
    **options: Any,
) -> int:
    """Temp file beside the target, fsync, rename: a part is whole or absent. Returns its rows.

    `source` is a table, rows already in key order, or parts to merge; merges stream row
    groups of ROW_GROUP rows, so
    the collector's memory stays flat whatever the size of the run. `options` go to the
    ParquetWriter (encodings); `metadata` goes in the file's key-value metadata.
    `summarize` (merges of metrics parts, a run's last part) puts a chart summary in the footer
    (expman/_storage/summary.py) when it is much smaller than the part. `by_key` (metrics
    parts) sorts the rows by key and puts the key index in the footer
    (expman/_storage/key_index.py); a merge keeps that order when every input has an index.
    A merge checks `stop` between groups of keys and raises Stopped once it is set.
    """
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema, compression=compression, **options) as writer:
            index: _key_index.KeyIndex | None = None
            if isinstance(source, KeyedRows):
                rows = 0
                for table in source.groups:
                    writer.write_table(table, row_group_size=ROW_GROUP)
                    rows += table.num_rows
                index = source.index
            elif isinstance(source, pa.Table):
                if by_key:
                    source, index = _key_index.sort_by_key(source)
                writer.write_table(source, row_group_size=ROW_GROUP)
                rows = source.num_rows
                # A run's only part (written at its finish) carries a summary as a merge's would;
                # one of fewer rows than a summary holds would not keep it.
                big = rows >= _summary.SUMMARY_BUCKETS * _summary.KEEP_RATIO
                summary = _summary.summarize(source) if summarize and big else {}
            else:
                files = [pq.ParquetFile(part.path, pre_buffer=False, buffer_size=1 << 16) for part in source]
                runs = [_key_runs(file) for file in files] if by_key else []
                if by_key and all(r is not None for r in runs):
                    rows, summary, index = _merge_by_key(writer, files, runs, summarize, stop)  # type: ignore[arg-type]
                else:  # inputs from before the index: concatenated, as they were
                    rows, summary = _merge_into(writer, files, summarize, stop)
            if summarize and _summary.worth_keeping(summary, rows):
                writer.add_key_value_metadata({_summary.SUMMARY_KEY: _summary.encode(summary)})
            if index is not None:
                writer.add_key_value_metadata({_key_index.KEY_INDEX: _key_index.encode(index)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return rows
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: nothing half-written stays; the WAL still has the rows
        raise


def merge_parts(parts: list[Part], level: int, schema: pa.Schema, metadata: dict[str, str] | None = None,
                summarize: bool = False, by_key: bool = False, stop: threading.Event | None = None,
                **options: Any) -> int:
    """Write `parts` (oldest first, one writer's, neighbours) as one part of `level` beside
    them, then delete them; until then readers skip the inputs, which lie inside the new
    part's range. Returns the rows written."""
    first = parts[0]
    target = first.path.parent / part_name(level, first.first, parts[-1].last, first.writer)
    rows = write_part(parts, target, schema, metadata, summarize, by_key, stop, **options)
    for part in parts:
        part.path.unlink(missing_ok=True)
    return rows
