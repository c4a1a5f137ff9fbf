"""Values reduced across ranks at read time: one row per key and step (`reduce=` of `Run.metrics`).

Rows are read a key at a time (through the key index, so memory holds one key's rows),
sorted by step once, and each run of equal steps reduced with numpy: no hashing, exact
medians, and distinct ranks counted as bit sets.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from expman._reader.scan import Query, Scan
from expman._storage.layout import KEY, RANK, STEP, TIME, VALUE, metrics_schema

if TYPE_CHECKING:
    import pyarrow as pa

    from expman._reader.live import MetricsTail

REDUCTIONS = ("mean", "min", "max", "median")


def reduce_across_ranks(tail: MetricsTail, query: Query, how: str) -> pa.Table:
    """One row per key and step: the reduction of the values over ranks, how many ranks had
    one, and the latest time. A key at a time where every part has a key index (memory
    holds one key's rows), else the whole read at once."""
    import pyarrow as pa

    if how not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {how!r}")
    query = replace(query, columns=(KEY, VALUE, STEP, RANK, TIME), numeric=True)
    batches = _key_batches(tail, query)
    if batches is None:
        pieces = [_reduce(Scan(tail, query).table, how)]
    else:
        pieces = [_reduce(Scan(tail, replace(query, keys=keys)).table, how) for keys in batches]
    pieces = [p for p in pieces if p.num_rows]
    return pa.concat_tables(pieces) if pieces else _reduced_schema().empty_table()


BATCH_ROWS = 1 << 21  # keys are read together until they hold this many rows


def _key_batches(tail: MetricsTail, query: Query) -> list[list[str]] | None:
    """The keys to read, in name order, cut into runs of about BATCH_ROWS rows (a big key
    alone; many small ones together, so a row group they share is decoded once); None
    when a part has no key index."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows: dict[str, int] = {}
    for part in tail.parts:
        index = tail.key_index(part.path)
        if index is None:
            return None
        for key, (_first, count) in index.items():
            rows[key] = rows.get(key, 0) + count
    if tail.tail is not None:
        for key in pc.unique(tail.tail.column(KEY).cast(pa.string())).to_pylist():
            rows.setdefault(key, 0)
    batches: list[list[str]] = []
    held = BATCH_ROWS
    for key in sorted(rows if query.keys is None else set(rows) & set(query.keys)):
        if held + rows[key] > BATCH_ROWS:
            batches.append([])
            held = 0
        batches[-1].append(key)
        held += rows[key]
    return batches


def _reduce(read: Callable[[], pa.Table], how: str) -> pa.Table:
    """Sort rows by (key, step) and reduce each run of equal ones with numpy: no hashing.
    min and max skip NaN (NaN only when every value is), mean keeps it, median is exact and
    skips NaN; rows without a step form one group per key, listed last. `read` gives the
    rows; they are freed as numpy takes them over (memory: about one copy)."""
    import pyarrow as pa

    table = read()
    if table.num_rows == 0:
        return _reduced_schema().empty_table()
    key_col = table.column(KEY).combine_chunks()
    names, keys = key_col.dictionary, key_col.indices.to_numpy(zero_copy_only=False)
    step_col = table.column(STEP)
    steps = (step_col.fill_null(_NO_STEP) if step_col.null_count else step_col).to_numpy()
    values = table.column(VALUE).to_numpy()
    ranks = table.column(RANK).to_numpy()
    times = table.column(TIME).cast(pa.int64()).to_numpy()
    del table, key_col, step_col
    single = bool((keys == keys[0]).all())
    sort_by = ((values,) if how == "median" else ()) + (steps,) + (() if single else (keys,))  # NaN sort last
    order = np.argsort(steps, kind="stable") if len(sort_by) == 1 else np.lexsort(sort_by)
    steps = steps[order]  # one at a time: each unsorted copy is freed before the next is sorted
    values = values[order]
    ranks = ranks[order]
    times = times[order]
    change = steps[1:] != steps[:-1]
    if not single:
        keys = keys[order]
        change |= keys[1:] != keys[:-1]
    del order
    starts = np.flatnonzero(np.r_[True, change])
    group_steps = steps[starts]
    return pa.table({
        KEY: pa.DictionaryArray.from_arrays(pa.array(keys[starts] if not single else np.full(len(starts), keys[0])),
                                            names).cast(pa.string()),
        STEP: pa.array(group_steps, pa.int64(), mask=group_steps == _NO_STEP),
        VALUE: pa.array(_reduce_values(values, starts, how), pa.float64()),
        "ranks": pa.array(_distinct_per_group(ranks, starts), pa.int64()),
        TIME: pa.array(np.maximum.reduceat(times, starts)).cast(_reduced_schema().field(TIME).type),
    }, schema=_reduced_schema())


_NO_STEP = np.iinfo(np.int64).max  # stands for a missing step while sorting: after every real one


def _reduce_values(values: np.ndarray, starts: np.ndarray, how: str) -> np.ndarray:
    """Each group's reduction (groups: rows [starts[i], starts[i + 1]), sorted by value for median)."""
    if how == "mean":
        return np.add.reduceat(values, starts) / np.diff(np.r_[starts, len(values)])
    if how == "min":
        return np.fmin.reduceat(values, starts)
    if how == "max":
        return np.fmax.reduceat(values, starts)
    finite = np.add.reduceat((~np.isnan(values)).astype(np.int64), starts)  # NaN sorted last in each group
    held = np.maximum(finite, 1)
    middle = (values[starts + (held - 1) // 2] + values[starts + held // 2]) / 2
    return np.where(finite > 0, middle, np.nan)


def _distinct_per_group(rank: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """How many distinct ranks each group (rows [starts[i], starts[i + 1])) holds."""
    low = int(rank.min())
    span = int(rank.max()) - low + 1
    if span <= 64:  # a bit per rank, or-ed over each group, in the narrowest integer that fits
        width = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.dtype(t).itemsize * 8 >= span)
        bits = (np.ones(1, width) << np.arange(span, dtype=width))[rank - low if low else rank]
        return np.bitwise_count(np.bitwise_or.reduceat(bits, starts)).astype(np.int64)
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(rank)]))
    pairs = np.unique(np.stack([group, rank.astype(np.int64)]), axis=1)
    return np.bincount(pairs[0], minlength=len(starts)).astype(np.int64)


def _reduced_schema() -> pa.Schema:
    import pyarrow as pa

    full = metrics_schema()
    return pa.schema([pa.field(KEY, pa.string()), pa.field(STEP, pa.int64()), pa.field(VALUE, pa.float64()),
                      pa.field("ranks", pa.int64()), pa.field(TIME, full.field(TIME).type)])
