"""Reading only the rows asked for: keys, ranks, a step range, some columns.

Metrics parts are sorted by key with a key index in the footer (expman/_storage/key_index.py):
a key's rows are found without decoding the others, its key column is not read at all (it
is one value), and row-group statistics on `step` and `rank` skip groups outside the
filters. Parts without an index (written before it existed) and the write-ahead tail are
filtered row group by row group. Batches come out with one dictionary for `key` and one for
`host` across the whole read, and columns that are constant within a batch (the key, the
host, an all-null `text`) share one buffer instead of taking 4 bytes a row each: a read
costs about 28 bytes per returned row (value, step, time, rank) beyond a fixed amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from expman._storage.key_index import KeyIndex, read_index, spans
from expman._storage.layout import HOST, KEY, METRIC_COLUMNS, RANK, STEP, TEXT, VALUE, metrics_schema

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from expman._reader.live import MetricsTail

_COMPACT = 0.5  # a slice keeping less than this share of its row group is copied out (the rest is freed)


@dataclass(frozen=True)
class Query:
    """What to read: None means everything."""

    keys: list[str] | None = None
    ranks: list[int] | None = None
    steps: tuple[int | None, int | None] | None = None  # inclusive bounds; rows without a step are left out
    columns: tuple[str, ...] = METRIC_COLUMNS
    numeric: bool = False  # only rows with a value (no text points)


def make_query(keys: str | Iterable[str] | None = None, ranks: int | Iterable[int] | None = None,
               steps: tuple[int | None, int | None] | range | None = None,
               columns: Iterable[str] | None = None, numeric: bool = False) -> Query:
    """A Query from what a caller passed, or ValueError/TypeError naming what is wrong."""
    if keys is not None:
        keys = [keys] if isinstance(keys, str) else list(dict.fromkeys(keys))
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"keys must be a string or strings, got {keys!r}")
    if ranks is not None:
        ranks = [ranks] if isinstance(ranks, int) else list(ranks)
        if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in ranks):
            raise TypeError(f"ranks must be an int or ints, got {ranks!r}")
        ranks = [int(r) for r in ranks]
    if steps is not None:
        steps = _step_bounds(steps)
    if columns is None:
        chosen = METRIC_COLUMNS
    else:
        asked = [columns] if isinstance(columns, str) else list(columns)
        unknown = [c for c in asked if c not in METRIC_COLUMNS]
        if unknown:
            raise ValueError(f"unknown metrics columns {unknown}: the columns are {list(METRIC_COLUMNS)}")
        chosen = tuple(c for c in METRIC_COLUMNS if c in asked)
    return Query(keys, ranks, steps, chosen, numeric)


def _step_bounds(steps: object) -> tuple[int | None, int | None]:
    if isinstance(steps, range):
        if steps.step != 1:
            raise ValueError(f"steps as a range must count by 1, got {steps!r}")
        return steps.start, steps.stop - 1
    if isinstance(steps, (tuple, list)) and len(steps) == 2 and all(
            s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool)) for s in steps):
        return (None if steps[0] is None else int(steps[0]), None if steps[1] is None else int(steps[1]))
    raise TypeError(f"steps must be (first, last) with ints or None (both included), or a range; got {steps!r}")


class _Dictionaries:
    """One dictionary per column across a read (it only grows, so an earlier batch's indices
    stay valid), and shared constant index buffers."""

    def __init__(self) -> None:
        self.names: dict[str, dict[str, int]] = {KEY: {}, HOST: {}}
        self._arrays: dict[str, pa.Array] = {}
        self._constants: dict[int, np.ndarray] = {}

    def code(self, column: str, name: str) -> int:
        return self.names[column].setdefault(name, len(self.names[column]))

    def dictionary(self, column: str) -> pa.Array:
        import pyarrow as pa

        names = self.names[column]
        cached = self._arrays.get(column)
        if cached is None or len(cached) != len(names):
            cached = self._arrays[column] = pa.array(list(names), pa.string())
        return cached

    def constant(self, code: int, rows: int) -> pa.Array:
        """`rows` int32 values all `code`, sharing one buffer (zeros come from calloc: no
        memory is touched for them at all)."""
        import pyarrow as pa

        held = self._constants.get(code)
        if held is None or len(held) < rows + 1:
            size = max(rows + 1, 2 * (0 if held is None else len(held)))
            if code == 0:  # calloc'ed pages: free until written, so make it big at once
                held = self._constants[code] = np.zeros(max(size, 1 << 20), np.int32)
            else:
                held = self._constants[code] = np.full(size, code, np.int32)
        return pa.array(held[:rows])

    def encode(self, column: str, array: pa.Array) -> pa.DictionaryArray:
        """`array` (dictionary or string) re-coded to this read's dictionary for `column`."""
        import pyarrow as pa

        if not pa.types.is_dictionary(array.type):
            array = array.dictionary_encode()
        codes = np.array([self.code(column, n) for n in array.dictionary.to_pylist()], np.int32)
        used = array.indices.to_numpy(zero_copy_only=False)
        if len(used) and (used == used[0]).all():
            indices = self.constant(int(codes[used[0]]), len(array))
        else:
            indices = pa.array(codes[used])
        return pa.DictionaryArray.from_arrays(indices, self.dictionary(column))

    def repeat(self, column: str, name: str, rows: int) -> pa.DictionaryArray:
        """`name` `rows` times, in this read's dictionary for `column`."""
        import pyarrow as pa

        return pa.DictionaryArray.from_arrays(self.constant(self.code(column, name), rows), self.dictionary(column))

    def null_text(self, rows: int) -> pa.Array:
        import pyarrow as pa

        zeros = self.constant(0, rows + 1).buffers()[1]
        return pa.Array.from_buffers(pa.string(), rows, [zeros, zeros, pa.py_buffer(b"")], null_count=rows)


class Scan:
    """The batches of `query` over a consistent look at a run (`MetricsTail` with open parts)."""

    def __init__(self, tail: MetricsTail, query: Query) -> None:
        self.tail, self.query = tail, query
        self.dicts = _Dictionaries()
        self.schema = _output_schema(query.columns)
        read = set(query.columns) - {KEY}
        if query.ranks is not None:
            read.add(RANK)
        if query.steps is not None:
            read.add(STEP)
        if query.numeric:
            read.add(VALUE)
        self._read = [c for c in METRIC_COLUMNS if c in read]

    def batches(self) -> Iterator[pa.RecordBatch]:
        for part in self.tail.parts:
            file = self.tail.opened[part.path]
            index = self.tail.key_index(part.path)
            if index is None:
                yield from self._unindexed(file)
            else:
                yield from self._indexed(file, index)
        if self.tail.tail is not None:
            for batch in self.tail.tail.to_batches():
                yield from self._finish(batch, None)

    def table(self) -> pa.Table:
        """Every batch in one table, `key` and `host` with this read's final dictionaries."""
        import pyarrow as pa

        batches = list(self.batches())
        if not batches:
            return self.schema.empty_table()
        table = pa.Table.from_batches(batches, self.schema)
        for column in (KEY, HOST):
            if column in self.query.columns:
                final = self.dicts.dictionary(column)
                chunks = [pa.DictionaryArray.from_arrays(c.indices, final) for c in table.column(column).chunks]
                table = table.set_column(table.schema.get_field_index(column), self.schema.field(column), pa.chunked_array(chunks, self.schema.field(column).type))
        return table

    # --- parts with a key index -------------------------------------------------------------
    def _indexed(self, file: pq.ParquetFile, index: KeyIndex) -> Iterator[pa.RecordBatch]:
        """One batch per row group: a group is decoded once however many keys it holds, and a
        run of 100,000 keys is 13 batches, not 100,000 (each would hold the dictionary so far)."""
        wanted = index if self.query.keys is None else {k: index[k] for k in self.query.keys if k in index}
        ranges = sorted((first, rows, key) for key, (first, rows) in wanted.items() if rows > 0)
        for group, pieces in _pieces_by_group(file.metadata, ranges):
            meta = file.metadata.row_group(group)
            if not self._may_match(meta):
                continue
            fixed = _constant_columns(meta, self._read)
            table = file.read_row_group(group, columns=[c for c in self._read if c not in fixed], use_threads=True)
            if len(pieces) == 1:
                start, stop, key = pieces[0]
                yield from self._finish(_slice(table, start, stop), key, fixed)
            else:
                yield from self._finish(_with_keys(table, pieces), None, fixed, keys_checked=True)

    # --- parts without one, and the write-ahead tail -------------------------------------------
    def _unindexed(self, file: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
        columns = sorted(set(self._read) | {KEY}, key=METRIC_COLUMNS.index)
        for group in range(file.metadata.num_row_groups):
            if self._may_match(file.metadata.row_group(group)):
                yield from self._finish(file.read_row_group(group, columns=columns, use_threads=True), None)

    def _may_match(self, group: pq.RowGroupMetaData) -> bool:
        """False when the row group's statistics rule out every row (no statistics: maybe)."""
        query = self.query
        checks = []
        if query.steps is not None:
            checks.append((STEP, lambda lo, hi: (query.steps[0] is None or hi >= query.steps[0])
                           and (query.steps[1] is None or lo <= query.steps[1])))
        if query.ranks is not None:
            checks.append((RANK, lambda lo, hi: any(lo <= r <= hi for r in query.ranks)))
        if query.keys is not None:
            checks.append((KEY, lambda lo, hi: any(lo <= k <= hi for k in query.keys)))
        for name, fits in checks:
            column = _column_index(group, name)
            stats = None if column is None else group.column(column).statistics
            if stats is None or not stats.has_min_max:
                continue
            lo, hi = (v.decode(errors="replace") if isinstance(v, bytes) else v for v in (stats.min, stats.max))
            if not fits(lo, hi):
                return False
        return True

    def _finish(self, table: pa.Table | pa.RecordBatch, key: str | None,
                fixed: dict[str, str | None] | None = None, keys_checked: bool = False) -> Iterator[pa.RecordBatch]:
        """Filter rows, re-code dictionaries, put columns in order: one output batch. `key`:
        the rows' one key (not read); `fixed`: columns with one value in these rows (not read);
        `keys_checked`: the rows are of asked keys only (found through the key index)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        query = self.query
        masks = []
        if key is None and query.keys is not None and not keys_checked:
            masks.append(pc.is_in(table.column(KEY), pa.array(query.keys, pa.string())))
        if query.ranks is not None:
            masks.append(pc.is_in(table.column(RANK), pa.array(query.ranks, pa.int32())))
        if query.steps is not None:
            lo, hi = query.steps
            step = table.column(STEP)
            masks.append(pc.is_valid(step))
            if lo is not None:
                masks.append(pc.greater_equal(step, lo))
            if hi is not None:
                masks.append(pc.less_equal(step, hi))
        if query.numeric:
            masks.append(pc.is_valid(table.column(VALUE)))
        if masks:
            mask = masks[0]
            for more in masks[1:]:
                mask = pc.and_kleene(mask, more)
            table = table.filter(mask)
        rows = table.num_rows
        if rows == 0:
            return
        out = []
        for name in query.columns:
            if name == KEY:
                out.append(self.dicts.repeat(KEY, key, rows) if key is not None
                           else self.dicts.encode(KEY, _one_chunk(table.column(KEY))))
                continue
            if fixed and name in fixed:
                out.append(self.dicts.null_text(rows) if name == TEXT else self.dicts.repeat(name, fixed[name], rows))
                continue
            column = _one_chunk(table.column(name))
            if name == HOST:
                column = self.dicts.encode(HOST, column)
            elif name == TEXT and column.null_count == rows:
                column = self.dicts.null_text(rows)
            out.append(column)
        yield pa.RecordBatch.from_arrays(out, schema=self.schema)


def _pieces_by_group(metadata: pq.FileMetaData,
                     ranges: list[tuple[int, int, str]]) -> Iterator[tuple[int, list[tuple[int, int, str]]]]:
    """Sorted (first row, rows, key) ranges cut at row-group bounds: each group in file order
    with its (start, stop, key) pieces, positions within the group."""
    bounds = np.cumsum([0] + [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]).tolist()
    current, pieces = -1, []
    group = 0
    for first, rows, key in ranges:
        stop = first + rows
        while bounds[group + 1] <= first:
            group += 1
        at = group
        while at < metadata.num_row_groups and bounds[at] < stop:
            if at != current:
                if pieces:
                    yield current, pieces
                current, pieces = at, []
            pieces.append((max(first, bounds[at]) - bounds[at], min(stop, bounds[at + 1]) - bounds[at], key))
            at += 1
    if pieces:
        yield current, pieces


def _slice(table: pa.Table, start: int, stop: int) -> pa.Table:
    """Rows [start, stop); copied out when they are a small share of the group, so the rest of
    the decoded group can be freed."""
    piece = table.slice(start, stop - start)
    if piece.num_rows < _COMPACT * table.num_rows:
        piece = piece.take(np.arange(piece.num_rows))
    return piece


def _with_keys(table: pa.Table, pieces: list[tuple[int, int, str]]) -> pa.Table:
    """The pieces' rows of a row group holding several keys, with their `key` column made from
    the key index (the column itself is not decoded)."""
    import pyarrow as pa

    starts = np.array([p[0] for p in pieces])
    stops = np.array([p[1] for p in pieces])
    lengths = stops - starts
    keys = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)),
                                          pa.array([p[2] for p in pieces], pa.string()))
    if (starts[1:] != stops[:-1]).any():  # some keys between them were not asked for
        table = table.take(np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]))
    else:
        table = _slice(table, int(starts[0]), int(stops[-1]))
    return table.append_column(KEY, keys)


def _constant_columns(group: pq.RowGroupMetaData, columns: list[str]) -> dict[str, str | None]:
    """`host` and `text` where the row group's statistics say they hold one value (one host;
    no text at all): made from that value instead of decoded, 4 bytes a row saved each."""
    fixed: dict[str, str | None] = {}
    for name in (HOST, TEXT):
        column = _column_index(group, name) if name in columns else None
        stats = None if column is None else group.column(column).statistics
        if stats is None or stats.null_count is None:
            continue
        if name == TEXT and stats.null_count == group.num_rows:
            fixed[TEXT] = None
        elif name == HOST and stats.null_count == 0 and stats.has_min_max and stats.min == stats.max:
            fixed[HOST] = stats.min if isinstance(stats.min, str) else bytes(stats.min).decode()
    return fixed


def _one_chunk(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def _column_index(group: pq.RowGroupMetaData, name: str) -> int | None:
    for i in range(group.num_columns):
        if group.column(i).path_in_schema == name:
            return i
    return None


def _output_schema(columns: tuple[str, ...]) -> pa.Schema:
    import pyarrow as pa

    full = metrics_schema()
    return pa.schema([full.field(c) for c in columns])


# --- one part, key by key (expman-tui's incremental reads) ------------------------------------
def read_keys(file: pq.ParquetFile, keys: list[str], columns: list[str],
              skip: dict[str, int] | None = None) -> dict[str, tuple[pa.Table, int]]:
    """Each key's rows in one part past its first `skip[key]` (rows a caller already holds from
    the parts this one merged: a merge puts each key's rows of its inputs one after another),
    and how many rows the key has in the part. Through the key index only the key's row
    groups are decoded; a part without one is read whole and split."""
    import pyarrow as pa
    import pyarrow.compute as pc

    skip = skip or {}
    index = read_index(file)
    out: dict[str, tuple[pa.Table, int]] = {}
    if index is None:
        table = file.read(columns=sorted(set(columns) | {KEY}, key=METRIC_COLUMNS.index), use_threads=True)
        names = table.column(KEY).cast(pa.string())
        for key in keys:
            rows = table.filter(pc.equal(names, key)).select(columns)
            out[key] = (rows.slice(skip.get(key, 0)), rows.num_rows)
        return out
    groups: dict[int, pa.Table] = {}
    for key in keys:
        first, count = index.get(key, (0, 0))
        held = min(skip.get(key, 0), count)
        pieces = []
        for span in spans(file.metadata, [(first + held, count - held)]):
            if span.group not in groups:
                groups[span.group] = file.read_row_group(span.group, columns=columns, use_threads=True)
            pieces.append(groups[span.group].slice(span.start, span.stop - span.start))
        schema = _output_schema(tuple(c for c in METRIC_COLUMNS if c in columns))
        out[key] = (pa.concat_tables(pieces) if pieces else schema.empty_table(), count)
    return out


def part_keys(file: pq.ParquetFile) -> set[str]:
    """The keys in a part: from its key index, else from its key column's dictionaries."""
    import pyarrow.compute as pc

    index = read_index(file)
    if index is not None:
        return set(index)
    out: set[str] = set()
    for chunk in file.read(columns=[KEY]).column(KEY).chunks:
        out.update(chunk.dictionary.take(pc.unique(chunk.indices)).to_pylist())
    return out
