"""Where each key's rows lie in a metrics part, so a reader decodes only the keys it asks for.

The collector writes metrics parts sorted by key (a stable sort: each key's points keep
their arrival order) and puts `expman.keys` in the Parquet footer: for each key, its first
row and its number of rows. A reader turns that into the row groups to decode and the
slice of each to keep; row-group statistics on `key` also let DuckDB and Polars skip the
other keys. Parts written before the index existed have none: readers then scan them whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from expman._storage.layout import KEY

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

KEY_INDEX = b"expman.keys"  # Parquet footer key-value metadata: JSON {key: [first row, rows]}

KeyIndex = dict[str, tuple[int, int]]  # key -> (first row, rows), in key order


def sort_by_key(table: pa.Table) -> tuple[pa.Table, KeyIndex]:
    """`table` (storage schema) stably sorted by key name, and where each key's rows now lie.

    Sorting the key's dictionary (a few names) and counting rows per name is all the
    comparing there is: the row order comes from a stable argsort of small integers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table, {}
    table = table.unify_dictionaries()  # one dictionary for every chunk: no copy of the rows
    chunks = table.column(KEY).chunks
    dictionary = chunks[0].dictionary
    names = dictionary.to_pylist()
    # Arrow sorts the names without the GIL (numpy's object sort holds it for seconds at a
    # million keys, stalling the collector's receive loop); UTF-8 byte order is str order.
    order_of_name = pc.array_sort_indices(dictionary).to_numpy()
    rank = np.empty(len(names), np.int32)
    rank[order_of_name] = np.arange(len(names), dtype=np.int32)
    ranked = rank[np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks])]
    counts = np.bincount(ranked, minlength=len(names))
    if not (np.diff(ranked) >= 0).all():
        table = table.take(pa.array(np.argsort(ranked, kind="stable")))
    index: KeyIndex = {}
    first = 0
    for position, name_at in enumerate(order_of_name):
        if counts[position]:
            index[names[name_at]] = (first, int(counts[position]))
            first += int(counts[position])
    return table, index


ENCODE_CHUNK = 20_000  # keys per json.dumps call: each holds the GIL, so a million keys in one would stall other threads


def encode(index: KeyIndex) -> bytes:
    items = list(index.items())
    pieces = [json.dumps({k: list(v) for k, v in items[i:i + ENCODE_CHUNK]}, separators=(",", ":"),
                         ensure_ascii=False)[1:-1] for i in range(0, len(items), ENCODE_CHUNK)]
    return ("{" + ",".join(pieces) + "}").encode()


def read_index(part: pq.ParquetFile) -> KeyIndex | None:
    """The part's key index; None when it has none (or one that does not add up)."""
    raw = (part.metadata.metadata or {}).get(KEY_INDEX)
    if raw is None:
        return None
    try:
        entries = json.loads(raw)
        index = {str(k): (int(v[0]), int(v[1])) for k, v in entries.items()}
    except (ValueError, TypeError, IndexError, AttributeError):
        return None
    expect = 0
    for first, rows in index.values():
        if first != expect or rows < 0:
            return None
        expect = first + rows
    return index if expect == part.metadata.num_rows else None


@dataclass(frozen=True)
class Span:
    """Rows [start, stop) of row group `group` (positions within the group)."""

    group: int
    start: int
    stop: int


def spans(metadata: pq.FileMetaData, ranges: list[tuple[int, int]]) -> list[Span]:
    """The row-group slices that hold the rows [first, first + rows) of each range (sorted,
    not overlapping), in file order."""
    bounds = np.cumsum([0] + [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
    out: list[Span] = []
    for first, rows in ranges:
        stop = first + rows
        if rows <= 0:
            continue
        group = int(np.searchsorted(bounds, first, side="right")) - 1
        while group < metadata.num_row_groups and bounds[group] < stop:
            lo, hi = max(first, int(bounds[group])), min(stop, int(bounds[group + 1]))
            if out and out[-1].group == group and out[-1].stop == lo - bounds[group]:
                out[-1] = Span(group, out[-1].start, hi - int(bounds[group]))
            else:
                out.append(Span(group, lo - int(bounds[group]), hi - int(bounds[group])))
            group += 1
    return out
