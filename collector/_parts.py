"""Writing Parquet parts: the one way the collector puts a part on disk."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from expman._storage import summary as _summary
from expman._storage.layout import Part, part_name

ROW_GROUP = 131_072
MERGE_FANIN = 8  # parts of one level merged into one of the next: a run keeps a few dozen files


def next_merge(parts: list[Part]) -> tuple[list[Part], int] | None:
    """The parts to merge next (the oldest MERGE_FANIN of the lowest full level) and the
    level of the result, or None when no level is full."""
    by_level: dict[int, list[Part]] = {}
    for p in parts:
        by_level.setdefault(p.level, []).append(p)
    full = next((lvl for lvl, group in sorted(by_level.items()) if len(group) >= MERGE_FANIN), None)
    return None if full is None else (by_level[full][:MERGE_FANIN], full + 1)


def _merge_into(writer: pq.ParquetWriter, parts: list[Part], summarize: bool) -> tuple[int, _summary.Summary]:
    """Stream the parts' rows into `writer`; with `summarize`, also their summary.

    Inputs that carry a summary lend it; the others are bucketed batch by batch on a
    second thread while this one encodes and compresses (numpy and Arrow release the GIL,
    so a merge takes about as long as the writing alone where a core is free).
    """
    rows = 0
    summary: _summary.Summary = {}
    files = [pq.ParquetFile(part.path) for part in parts]
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


def write_part(
    source: pa.Table | list[Part], target: Path, schema: pa.Schema, metadata: dict[str, str] | None = None,
    summarize: bool = False, **options: Any,
) -> None:
    """Temp file beside the target, fsync, rename: a part is whole or absent.

    `source` is a table, or parts to merge; merges stream row groups of ROW_GROUP rows, so
    the collector's memory stays flat whatever the size of the run. `options` go to the
    ParquetWriter (encodings); `metadata` goes in the file's key-value metadata.
    `summarize` (merges of metrics parts) puts a chart summary in the footer
    (expman/_storage/summary.py) when it is much smaller than the part.
    """
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd", **options) as writer:
            if isinstance(source, pa.Table):
                writer.write_table(source, row_group_size=ROW_GROUP)
            else:
                rows, summary = _merge_into(writer, source, summarize)
                if summarize and _summary.worth_keeping(summary, rows):
                    writer.add_key_value_metadata({_summary.SUMMARY_KEY: _summary.encode(summary)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: nothing half-written stays; the WAL still has the rows
        raise


def merge_parts(parts: list[Part], level: int, schema: pa.Schema, metadata: dict[str, str] | None = None,
                summarize: bool = False, **options: Any) -> None:
    """Write `parts` (oldest first, one writer's) as one part of `level` beside them, then
    delete them; until then readers skip the inputs, which lie inside the new part's range."""
    first = parts[0]
    target = first.path.parent / part_name(level, first.first, parts[-1].last, first.writer)
    write_part(parts, target, schema, metadata, summarize, **options)
    for part in parts:
        part.path.unlink(missing_ok=True)
