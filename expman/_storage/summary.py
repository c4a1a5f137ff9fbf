"""Chart summaries of metrics parts: min, max, sum and count per (key, rank, step bucket).

A merged Parquet part carries, in its footer, each key's points reduced to at most
SUMMARY_BUCKETS buckets per rank on the step axis (expman._storage.buckets), plus the key's
point count, step range and last point. A reader that draws charts (expman-tui) then
opens a run of tens of millions of points from kilobytes instead of reading every point.

The collector writes summaries when it merges parts: a merged part's summary follows
from its inputs' summaries (bucket grids are powers of two, so finer grids fold into
coarser ones), and inputs without one (fresh level-0 parts) are summarized from the
rows the merge streams anyway, so each point is bucketed once. A summary is only kept
when it is much smaller than the part; a reader falls back to the points otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from expman._storage.buckets import Buckets, bucket_width, combine, empty
from expman._storage.layout import KEY, RANK, STEP, VALUE

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

SUMMARY_KEY = b"expman.summary"  # Parquet footer key-value metadata (not in the Arrow schema)
SUMMARY_VERSION = 1
SUMMARY_BUCKETS = 2048  # per key and rank: enough for charts ~500 terminal columns wide
MAX_SUMMARY_ROWS = 1 << 18  # fewer buckets per series when a part has very many keys x ranks
KEEP_RATIO = 4  # keep a summary only if the part has this many times more rows


@dataclass(frozen=True)
class KeySummary:
    """One key's points in one part, on the step axis."""

    points: int  # numeric values (NaN and inf included; text-only points left out)
    nonfinite: int
    x_min: float  # finite steps only; inf / -inf when no point has one
    x_max: float
    last_value: float | None  # the last numeric point in arrival order
    last_x: float | None  # its step (NaN when it had none)
    buckets: Buckets


Summary = dict[str, KeySummary]  # every key of a part, in first-seen order


def summarize(table: pa.Table, buckets: int = SUMMARY_BUCKETS, width: float | None = None) -> Summary:
    """Summarize rows in the storage schema (at least key, value, step, rank).

    Each key gets its own bucket width (for `buckets` buckets over its steps), or `width`
    for every key: a merge passes the width its whole output needs (merge_width), so a
    batch's summary is already small and folding it in is cheap.

    Numpy grouped reductions over a (key, rank, bucket) grid: no sort and
    no Python loop over points (~60-120 ns a point; the collector pays it once per point).
    Long on purpose: one pass of array steps over the same locals, which split into
    functions would only pass a dozen arrays around.
    """
    import pyarrow as pa

    if table.num_rows == 0:
        return {}
    table = table.select([KEY, VALUE, STEP, RANK]).unify_dictionaries().combine_chunks()
    key_col = table.column(KEY).chunk(0)
    if not pa.types.is_dictionary(key_col.type):
        key_col = key_col.dictionary_encode()
    names = key_col.dictionary.to_pylist()
    index = key_col.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    value_col = table.column(VALUE).chunk(0)
    value = value_col.to_numpy(zero_copy_only=False)  # nulls (text points) become NaN ...
    step = table.column(STEP).chunk(0).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)  # ... and NaN
    rank = table.column(RANK).chunk(0).to_numpy(zero_copy_only=False).astype(np.int64)
    nkeys = len(names)
    out: Summary = {names[i]: _NO_POINTS for i in np.flatnonzero(np.bincount(index, minlength=nkeys))}
    if value_col.null_count:
        keep = np.flatnonzero(value_col.is_valid().to_numpy(zero_copy_only=False))
        index, value, step, rank = index[keep], value[keep], step[keep], rank[keep]
    if len(index) == 0:
        return out

    points = np.bincount(index, minlength=nkeys)
    finite_value = np.isfinite(value)
    nonfinite = np.bincount(index[~finite_value], minlength=nkeys)
    last = np.full(nkeys, -1)
    np.maximum.at(last, index, np.arange(len(index)))  # each key's latest arrival
    x_min, x_max = np.full(nkeys, np.inf), np.full(nkeys, -np.inf)
    np.fmin.at(x_min, index, step)  # fmin/fmax skip NaN steps
    np.fmax.at(x_max, index, step)
    rmin = int(rank.min())
    nranks = int(rank.max()) - rmin + 1
    per_series = _buckets_per_series(int(np.count_nonzero(points)) * nranks, buckets)
    if width is None:
        width = np.array([bucket_width(hi - lo, per_series) for lo, hi in zip(x_min, x_max)])
    else:
        width = np.full(nkeys, width)
    has_x = np.isfinite(x_min)
    first_bucket, span = np.zeros(nkeys, np.int64), np.zeros(nkeys, np.int64)  # span: buckets of each key
    first_bucket[has_x] = np.floor(x_min[has_x] / width[has_x])
    span[has_x] = np.floor(x_max[has_x] / width[has_x]) - first_bucket[has_x] + 1
    offset = np.concatenate(([0], np.cumsum(span * nranks)))  # each key's cells: nranks x its buckets
    last_value, last_x = value[last], step[last]

    ok = finite_value & np.isfinite(step)  # what a chart draws
    if not ok.all():
        index, value, step, rank = index[ok], value[ok], step[ok], rank[ok]
    bucket = np.floor(step / width[index]).astype(np.int64) - first_bucket[index]
    cell = offset[index] + (rank - rmin) * span[index] + bucket
    cells = int(offset[-1])
    if cells > 4 * len(cell) + 4096:  # sparse grid (many ranks, few points each): number the cells used
        used, cell = np.unique(cell, return_inverse=True)
        cells = len(used)
    else:
        used = None
    count = np.bincount(cell, minlength=cells)
    total = np.bincount(cell, weights=value, minlength=cells)
    lo_v, hi_v = np.full(cells, np.inf), np.full(cells, -np.inf)
    np.minimum.at(lo_v, cell, value)
    np.maximum.at(hi_v, cell, value)
    sel = np.flatnonzero(count)
    present = sel if used is None else used[sel]
    count, total, lo_v, hi_v = count[sel], total[sel], lo_v[sel], hi_v[sel]
    cell_key = np.searchsorted(offset, present, side="right") - 1
    within = present - offset[cell_key]
    cell_rank, cell_bucket = np.divmod(within, np.maximum(span[cell_key], 1))
    bounds = np.searchsorted(cell_key, np.arange(nkeys + 1))
    for k in np.flatnonzero(points):
        a, b = bounds[k], bounds[k + 1]
        kept = Buckets(float(width[k]), (cell_rank[a:b] + rmin).astype(np.int32), cell_bucket[a:b] + first_bucket[k],
                       lo_v[a:b], hi_v[a:b], total[a:b], count[a:b].astype(np.int64))
        out[names[k]] = KeySummary(int(points[k]), int(nonfinite[k]), float(x_min[k]), float(x_max[k]),
                                   float(last_value[k]), float(last_x[k]), kept)
    return out


_NO_POINTS = KeySummary(0, 0, math.inf, -math.inf, None, None, empty(1.0))


def merge_width(files: list[pq.ParquetFile], buckets: int = SUMMARY_BUCKETS) -> float | None:
    """The bucket width for the steps of all these parts together, from their row-group
    statistics (no data read); None when some part has no statistics for the step."""
    lo, hi = math.inf, -math.inf
    for file in files:
        meta = file.metadata
        column = file.schema_arrow.get_field_index(STEP)
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(column).statistics
            if stats is None or not stats.has_min_max:
                if stats is not None and stats.null_count == meta.row_group(i).num_rows:
                    continue  # only text points without steps
                return None
            lo, hi = min(lo, stats.min), max(hi, stats.max)
    return bucket_width(hi - lo, buckets)


def _buckets_per_series(series: int, buckets: int) -> int:
    fits = max(1, MAX_SUMMARY_ROWS // max(1, series))
    return max(64, min(buckets, 1 << int(math.log2(fits))))


def merge(summaries: list[Summary], buckets: int = SUMMARY_BUCKETS) -> Summary:
    """The summary of parts concatenated in the given order."""
    keys: dict[str, list[KeySummary]] = {}
    for summary in summaries:
        for key, ks in summary.items():
            keys.setdefault(key, []).append(ks)
    series = sum(_rank_span([s.buckets for s in group]) for group in keys.values())
    per_series = _buckets_per_series(series, buckets)
    out: Summary = {}
    for key, group in keys.items():
        x_min = min(s.x_min for s in group)
        x_max = max(s.x_max for s in group)
        width = max([bucket_width(x_max - x_min, per_series)] + [s.buckets.width for s in group if len(s.buckets)])
        last = next((s for s in reversed(group) if s.points), None)
        out[key] = KeySummary(sum(s.points for s in group), sum(s.nonfinite for s in group), x_min, x_max,
                              last.last_value if last else None, last.last_x if last else None,
                              combine([s.buckets for s in group], width))
    return out


def _rank_span(parts: list[Buckets]) -> int:
    """How many ranks a key's buckets may cover, from the rank range (no sort: this runs per merged batch)."""
    used = [b.rank for b in parts if len(b)]
    if not used:
        return 1
    return int(max(r.max() for r in used)) - int(min(r.min() for r in used)) + 1


def rows(summary: Summary) -> int:
    return sum(len(s.buckets) for s in summary.values())


def worth_keeping(summary: Summary, part_rows: int) -> bool:
    return bool(summary) and rows(summary) * KEEP_RATIO <= part_rows


# --- encoding: one Arrow IPC stream (zstd), per-key figures as JSON in its metadata ---------


def encode(summary: Summary) -> bytes:
    import pyarrow as pa

    names = list(summary)
    parts = [s.buckets for s in summary.values()]
    key_index = np.concatenate([np.full(len(b), i, np.int32) for i, b in enumerate(parts)]) if parts else np.empty(0, np.int32)
    figures = {k: [s.buckets.width, s.x_min, s.x_max, s.points, s.nonfinite, s.last_value, s.last_x]
               for k, s in summary.items()}
    meta = {"version": str(SUMMARY_VERSION), "keys": json.dumps(figures)}

    def column(field: str, dtype: type) -> np.ndarray:
        return np.concatenate([getattr(b, field) for b in parts]).astype(dtype) if parts else np.empty(0, dtype)

    table = pa.table({
        KEY: pa.DictionaryArray.from_arrays(pa.array(key_index), pa.array(names, pa.string())),
        RANK: column("rank", np.int32), "bucket": column("bucket", np.int64), "lo": column("lo", np.float64),
        "hi": column("hi", np.float64), "total": column("total", np.float64), "count": column("count", np.int64),
    }).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(raw: bytes) -> Summary | None:
    """The summary in `raw`, or None if it is from a newer version (the reader uses the points)."""
    import pyarrow as pa

    table = pa.ipc.open_stream(raw).read_all()
    meta = table.schema.metadata or {}
    if int(meta.get(b"version", b"0")) != SUMMARY_VERSION:
        return None
    figures = json.loads(meta[b"keys"])  # in the order of the dictionary's indices
    index = table.column(KEY).combine_chunks().indices.to_numpy(zero_copy_only=False)
    fields = (RANK, "bucket", "lo", "hi", "total", "count")
    columns = [table.column(f).to_numpy() for f in fields]
    out: Summary = {}
    for i, (key, (width, x_min, x_max, points, nonfinite, last_value, last_x)) in enumerate(figures.items()):
        lo, hi = np.searchsorted(index, [i, i + 1])
        out[key] = KeySummary(points, nonfinite, x_min, x_max, last_value, last_x,
                              Buckets(width, *(c[lo:hi] for c in columns)))
    return out


def read_summary(part: Path | pq.ParquetFile) -> Summary | None:
    """The summary in a part's footer; None when it has none (small parts, level 0, older writers)."""
    import pyarrow.parquet as pq

    file = part if isinstance(part, pq.ParquetFile) else pq.ParquetFile(part)
    metadata = file.metadata.metadata or {}
    raw = metadata.get(SUMMARY_KEY)
    return decode(raw) if raw else None
