"""Writing Parquet parts: the one way the collector puts a part on disk."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from expman._storage import key_index as _key_index
from expman._storage import summary as _summary
from expman._storage.layout import Part, part_name

ROW_GROUP = 131_072
MIN_GROUP = ROW_GROUP // 8  # a key that starts past this many buffered rows starts a row group
STREAM_BATCH = 16_384  # rows a by-key merge holds per input while it streams
MERGE_FANIN = 8  # parts of one level merged into one of the next: a run keeps a few dozen files


def next_merge(parts: list[Part]) -> tuple[list[Part], int] | None:
    """The parts to merge next (the oldest MERGE_FANIN of the lowest full level) and the
    level of the result, or None when no level is full."""
    by_level: dict[int, list[Part]] = {}
    for p in parts:
        by_level.setdefault(p.level, []).append(p)
    full = next((lvl for lvl, group in sorted(by_level.items()) if len(group) >= MERGE_FANIN), None)
    return None if full is None else (by_level[full][:MERGE_FANIN], full + 1)


def _merge_into(writer: pq.ParquetWriter, files: list[pq.ParquetFile], summarize: bool) -> tuple[int, _summary.Summary]:
    """Stream the parts' rows into `writer`; with `summarize`, also their summary.

    Inputs that carry a summary lend it; the others are bucketed batch by batch on a
    second thread while this one encodes and compresses (numpy and Arrow release the GIL,
    so a merge takes about as long as the writing alone where a core is free).
    """
    rows = 0
    summary: _summary.Summary = {}
    width = _summary.merge_width(files) if summarize else None
    pending: deque[Future[_summary.Summary]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="expman-summary") as pool:

        def fold(keep: int) -> None:
            nonlocal summary
            while len(pending) > keep:  # in order: the last point of a key is the last one merged
                summary = _summary.merge([summary, pending.popleft().result()])

        for file in files:
            known = _summary.read_summary(file) if summarize else None
            if known is not None:
                fold(0)
                summary = _summary.merge([summary, known])
            for batch in file.iter_batches(batch_size=ROW_GROUP):
                writer.write_batch(batch, row_group_size=ROW_GROUP)
                rows += batch.num_rows
                if summarize and known is None:  # each point is bucketed once, here
                    pending.append(pool.submit(_summary.summarize, pa.Table.from_batches([batch]), width=width))
                    fold(2)
        fold(0)
    return rows, summary


class _Stream:
    """One input of a by-key merge, read front to back in small batches."""

    def __init__(self, file: pq.ParquetFile) -> None:
        self._batches = file.iter_batches(batch_size=STREAM_BATCH)
        self._head: pa.RecordBatch | None = None

    def take(self, rows: int) -> list[pa.RecordBatch]:
        out = []
        while rows > 0:
            if self._head is None or self._head.num_rows == 0:
                self._head = next(self._batches)
            piece = self._head.slice(0, rows)
            self._head = self._head.slice(piece.num_rows)
            out.append(piece)
            rows -= piece.num_rows
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

    @property
    def position(self) -> int:
        """Rows written or buffered: where the next row will land."""
        return self.rows + self._buffered

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


def _merge_by_key(writer: pq.ParquetWriter, files: list[pq.ParquetFile], indexes: list[_key_index.KeyIndex],
                  summarize: bool) -> tuple[int, _summary.Summary, _key_index.KeyIndex]:
    """Merge parts sorted by key into one sorted by key: for each key, each input's rows of
    it in input order (so each key keeps its arrival order). Every input is one stream read
    once, front to back, a batch at a time; memory stays flat whatever the fan-in. Summaries
    are folded per key (inputs that carry one lend it), then fitted to one budget.
    """
    streams = [_Stream(file) for file in files]
    known = [_summary.read_summary(file) if summarize else None for file in files]
    width = _summary.merge_width(files) if summarize else None
    out, index = _GroupWriter(writer), {}
    per_key: dict[str, _summary.Summary] = {}
    pending: deque[tuple[str, Future[_summary.Summary] | _summary.Summary]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="expman-summary") as pool:

        def fold(keep: int) -> None:
            while len(pending) > keep:  # in order: the last point of a key is the last one merged
                key, done = pending.popleft()
                piece = done if isinstance(done, dict) else done.result()
                per_key[key] = _summary.merge([per_key.get(key, {}), piece])

        for key in sorted(set().union(*indexes)):
            out.key_boundary()
            first = out.position
            for stream, held, lent in zip(streams, indexes, known):
                if key not in held:
                    continue
                batches = stream.take(held[key][1])
                out.add(batches)
                if lent is not None:
                    pending.append((key, {key: lent[key]} if key in lent else {}))
                elif summarize:
                    pending.append((key, pool.submit(_summary.summarize, pa.Table.from_batches(batches), width=width)))
                fold(2)
            index[key] = (first, out.position - first)
        out.flush()
        fold(0)
    summary = _summary.merge([{k: s[k] for k, s in per_key.items() if k in s}]) if per_key else {}
    return out.rows, summary, index


def write_part(
    source: pa.Table | list[Part], target: Path, schema: pa.Schema, metadata: dict[str, str] | None = None,
    summarize: bool = False, by_key: bool = False, **options: Any,
) -> None:
    """Temp file beside the target, fsync, rename: a part is whole or absent.

    `source` is a table, or parts to merge; merges stream row groups of ROW_GROUP rows, so
    the collector's memory stays flat whatever the size of the run. `options` go to the
    ParquetWriter (encodings); `metadata` goes in the file's key-value metadata.
    `summarize` (merges of metrics parts) puts a chart summary in the footer
    (expman/_storage/summary.py) when it is much smaller than the part. `by_key` (metrics
    parts) sorts the rows by key and puts the key index in the footer
    (expman/_storage/key_index.py); a merge keeps that order when every input has an index.
    """
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd", **options) as writer:
            index: _key_index.KeyIndex | None = None
            if isinstance(source, pa.Table):
                if by_key:
                    source, index = _key_index.sort_by_key(source)
                writer.write_table(source, row_group_size=ROW_GROUP)
            else:
                files = [pq.ParquetFile(part.path, pre_buffer=False, buffer_size=1 << 16) for part in source]
                indexes = [_key_index.read_index(file) for file in files] if by_key else []
                if by_key and all(i is not None for i in indexes):
                    rows, summary, index = _merge_by_key(writer, files, indexes, summarize)  # type: ignore[arg-type]
                else:  # inputs from before the index: concatenated, as they were
                    rows, summary = _merge_into(writer, files, summarize)
                if summarize and _summary.worth_keeping(summary, rows):
                    writer.add_key_value_metadata({_summary.SUMMARY_KEY: _summary.encode(summary)})
            if index is not None:
                writer.add_key_value_metadata({_key_index.KEY_INDEX: _key_index.encode(index)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: nothing half-written stays; the WAL still has the rows
        raise


def merge_parts(parts: list[Part], level: int, schema: pa.Schema, metadata: dict[str, str] | None = None,
                summarize: bool = False, by_key: bool = False, **options: Any) -> None:
    """Write `parts` (oldest first, one writer's) as one part of `level` beside them, then
    delete them; until then readers skip the inputs, which lie inside the new part's range."""
    first = parts[0]
    target = first.path.parent / part_name(level, first.first, parts[-1].last, first.writer)
    write_part(parts, target, schema, metadata, summarize, by_key, **options)
    for part in parts:
        part.path.unlink(missing_ok=True)
