"""One run's metric series, read incrementally and reduced to what a chart can show.

Finished Parquet parts never change, and each is named by the write-ahead segments it
holds (docs/storage.md). So a part is read once per key and its points are kept (raw
arrays, least recently used first out past a byte budget). When the collector merges
parts, each key's rows in the new part are its rows in the old ones, in order: the
points already held are reused and only the key's rows past them are read (through the
part's key index, only their row groups). Parts and the write-ahead records not yet in a
part come from expman/_reader/live.py, which decodes each record once.

Merged parts (and a run's only part) carry a chart summary in their footer
(expman/_storage/summary.py): with x = step, such a part is drawn from its summary
without reading its points, unless the chart asks
for finer buckets than the summary has. That is what opens a 10 M-point run in well
under a second. Only the columns a chart needs are read (value, step, rank; time when x
is time). Everything here runs on worker threads; nothing here knows about the UI.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from expman._reader.live import MetricsTail, open_part
from expman._reader.scan import part_keys, read_keys
from expman._storage import summary as _summary
from expman._storage.files import LOCAL, Files
from expman._storage.layout import KEY, RANK, STEP, TIME, VALUE, Part

from expman._storage.buckets import Buckets, aggregate, bucket_width, combine

X_STEP, X_TIME = "step", "time"
DEFAULT_BUDGET = 1 << 30  # bytes of raw points kept per run
_TAIL = "<wal>"


@dataclass
class Chunk:
    """The numeric points of one key in one part (or in the write-ahead tail), in arrival order."""

    step: np.ndarray  # float64, NaN where the point has no step
    value: np.ndarray  # float64 (NaN and inf kept; text points left out)
    rank: np.ndarray  # int32
    time: np.ndarray | None  # float64 microseconds since the epoch; None when not read
    _spans: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    _lasts: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return self.step.nbytes + self.value.nbytes + self.rank.nbytes + (0 if self.time is None else self.time.nbytes)

    def __len__(self) -> int:
        return len(self.value)

    def x(self, xkind: str) -> np.ndarray:
        if xkind == X_TIME:
            assert self.time is not None
            return self.time
        return self.step

    def span(self, xkind: str) -> tuple[float, float]:
        """(min, max) of x over points that have one; (inf, -inf) when none."""
        if xkind not in self._spans:
            x = self.x(xkind)
            finite = x[np.isfinite(x)] if len(x) else x
            self._spans[xkind] = (float(finite.min()), float(finite.max())) if len(finite) else (np.inf, -np.inf)
        return self._spans[xkind]


def empty_chunk(with_time: bool) -> Chunk:
    return Chunk(np.empty(0), np.empty(0), np.empty(0, np.int32), np.empty(0) if with_time else None)


def _points(entry: Chunk | _summary.KeySummary) -> int:
    return entry.points if isinstance(entry, _summary.KeySummary) else len(entry)


def _span(entry: Chunk | _summary.KeySummary, xkind: str) -> tuple[float, float]:
    return (entry.x_min, entry.x_max) if isinstance(entry, _summary.KeySummary) else entry.span(xkind)


def concat_chunks(chunks: list[Chunk]) -> Chunk:
    with_time = all(c.time is not None for c in chunks)
    return Chunk(
        np.concatenate([c.step for c in chunks]),
        np.concatenate([c.value for c in chunks]),
        np.concatenate([c.rank for c in chunks]),
        np.concatenate([c.time for c in chunks]) if with_time else None,  # type: ignore[misc]
    )


@dataclass(frozen=True)
class Series:
    """What a chart draws for one key: buckets over the whole x range, and the latest point."""

    key: str
    xkind: str
    buckets: Buckets
    x_range: tuple[float, float]
    points: int
    nonfinite: int
    last_value: float | None  # at the highest x: the mean over the ranks that reached it
    last_x: float | None
    last_by_rank: dict[int, tuple[float, float]] = field(default_factory=dict)  # rank -> (x, value) at its highest x

    @property
    def empty(self) -> bool:
        return len(self.buckets) == 0


def split_table(table: pa.Table, keys: list[str], with_time: bool) -> dict[str, Chunk]:
    """Rows of `table` (storage schema, some columns) split into one Chunk per wanted key.

    Works on the dictionary indices of each record batch with numpy: no Arrow filter copies.
    """
    pieces: dict[str, list[Chunk]] = {k: [] for k in keys}
    for batch in table.to_batches():
        if batch.num_rows == 0:
            continue
        key_col = batch.column(KEY)
        if not pa.types.is_dictionary(key_col.type):
            key_col = key_col.dictionary_encode()
        indices = key_col.indices.to_numpy(zero_copy_only=False)
        names = key_col.dictionary.to_pylist()
        value_col = batch.column(VALUE)
        valid = None if value_col.null_count == 0 else value_col.is_valid().to_numpy(zero_copy_only=False)
        columns = _numpy_columns(batch, with_time)
        for key in keys:
            if key not in names:
                continue
            mask = indices == names.index(key)
            if valid is not None:
                mask &= valid
            if mask.all():
                pieces[key].append(Chunk(*columns))
            elif mask.any():
                pieces[key].append(Chunk(*(None if c is None else c[mask] for c in columns)))
    return {k: concat_chunks(p) if len(p) > 1 else (p[0] if p else empty_chunk(with_time)) for k, p in pieces.items()}


def one_key_chunk(table: pa.Table, with_time: bool) -> Chunk:
    """The numeric points of a table that holds one key's rows (no key column needed)."""
    pieces = []
    for batch in table.to_batches():
        if batch.num_rows == 0:
            continue
        columns = _numpy_columns(batch, with_time)
        value_col = batch.column(VALUE)
        if value_col.null_count:
            mask = value_col.is_valid().to_numpy(zero_copy_only=False)
            columns = tuple(None if c is None else c[mask] for c in columns)
        pieces.append(Chunk(*columns))
    return concat_chunks(pieces) if len(pieces) > 1 else (pieces[0] if pieces else empty_chunk(with_time))


def _numpy_columns(batch: pa.RecordBatch, with_time: bool) -> tuple:
    value = batch.column(VALUE).to_numpy(zero_copy_only=False)
    step_col = batch.column(STEP)
    if step_col.null_count:
        step = pc.fill_null(step_col.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    else:
        step = step_col.to_numpy().astype(np.float64)
    rank = batch.column(RANK).to_numpy().astype(np.int32, copy=False)
    time_us = batch.column(TIME).cast(pa.int64()).to_numpy().astype(np.float64) if with_time else None
    return step, value, rank, time_us


def last_points(entries: list[Chunk | _summary.KeySummary], xkind: str) -> dict[int, tuple[float, float]]:
    """Each rank's point at its highest x (the latest arrival among equals), over entries in
    arrival order. A part summary knows only its last point, not its rank: it counts as rank -1."""
    best: dict[int, tuple[float, float]] = {}
    for entry in entries:
        if isinstance(entry, _summary.KeySummary):
            usable = entry.last_value is not None and entry.last_x is not None and np.isfinite(entry.last_x)
            found = {-1: (entry.last_x, entry.last_value)} if usable else {}
        else:
            if xkind not in entry._lasts:  # parts never change: once per part and key
                entry._lasts[xkind] = _chunk_last(entry, xkind)
            found = entry._lasts[xkind]
        for rank, (x, v) in found.items():
            if rank not in best or x >= best[rank][0]:
                best[rank] = (x, v)
    return best


def _chunk_last(chunk: Chunk, xkind: str) -> dict[int, tuple[float, float]]:
    x, value, rank = chunk.x(xkind), chunk.value, chunk.rank
    ok = np.isfinite(x) & ~np.isnan(value)
    if not ok.all():
        x, value, rank = x[ok], value[ok], rank[ok]
    if len(x) == 0:
        return {}
    out = {}
    for r in np.unique(rank).tolist():
        sel = np.flatnonzero(rank == r)
        xs = x[sel]
        i = sel[len(xs) - 1 - int(np.argmax(xs[::-1]))]  # the last of the maxima
        out[int(r)] = (float(x[i]), float(value[i]))
    return out


class MetricsSource:
    """Series of one run; thread-safe, meant to be called from workers."""

    def __init__(self, run_dir: str | os.PathLike[str], budget_bytes: int = DEFAULT_BUDGET, *,
                 files: Files = LOCAL) -> None:
        self.run_dir = run_dir if isinstance(run_dir, PurePath) else Path(run_dir)
        self.files = files  # the run's filesystem: the local disk, or a bucket (tui/data/store.py)
        self.budget = budget_bytes
        self._lock = threading.RLock()
        self._parts: list[Part] = []
        self._rows: dict[str, int] = {}  # part name -> rows in the file (once read)
        self._key_rows: dict[tuple[str, str], int] = {}  # (part name, key) -> the key's rows there, text too
        self._ranges: dict[str, tuple[int, int]] = {}  # part name -> segment range
        self._writers: dict[str, str] = {}  # part name -> the collector that wrote it
        self._raw: OrderedDict[tuple[str, str], Chunk] = OrderedDict()
        self._raw_bytes = 0
        self._aggs: dict[tuple[str, str, str, float], Buckets] = {}
        self._part_keys: dict[str, set[str]] = {}
        self._summaries: dict[str, _summary.Summary | None] = {}  # part name -> its footer's summary
        self._tail: pa.Table | None = None
        self._tail_chunks: dict[tuple[str, bool], Chunk] = {}
        self._live = MetricsTail(self.run_dir, files)
        self.reads = 0  # parts (or row-group ranges) read from disk: for tests and the benchmark

    # --- refreshing --------------------------------------------------------------------
    def refresh(self) -> bool:
        """Look for new parts and write-ahead records; True when something changed."""
        with self._lock:
            changed = self._live.poll()
            if changed:
                parts = self._live.parts
                for p in parts:
                    self._ranges[p.path.name] = (p.first, p.last)
                    self._writers[p.path.name] = p.writer
                self._parts = parts
                self._tail = self._live.tail
                self._tail_chunks.clear()
            return changed

    # --- keys ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every metric key of the run, sorted."""
        with self._lock:
            found: set[str] = set()
            for part in self._parts:
                name = part.path.name
                if name not in self._part_keys:
                    summary = self._summary(part)
                    self._part_keys[name] = set(summary) if summary is not None else self._read_keys(part)
                found |= self._part_keys[name]
            if self._tail is not None:
                found |= set(pc.unique(self._tail.column(KEY).cast(pa.string())).to_pylist())
            return sorted(found)

    def _read_keys(self, part: Part) -> set[str]:
        try:
            return part_keys(open_part(self.files, part.path))
        except FileNotFoundError:
            return set()

    # --- series ----------------------------------------------------------------------------
    def series(self, keys: list[str], xkind: str = X_STEP, target: int = 400,
               per_rank: bool = True) -> dict[str, Series]:
        """Each key's points in about `target` buckets (between target/2 and target)."""
        with_time = xkind == X_TIME
        with self._lock:
            for _attempt in range(5):
                try:
                    summaries = {} if with_time else self._usable_summaries()
                    self._load(keys, with_time, [p for p in self._parts if p.path.name not in summaries])
                    out = {key: self._series(key, xkind, target, summaries) for key in keys}
                    break
                except FileNotFoundError:  # merged away while we read: look again
                    self.refresh()
            else:
                raise RuntimeError(f"{self.run_dir}: metrics parts kept changing while being read")
            self._forget_retired()
            return out

    def _series(self, key: str, xkind: str, target: int, summaries: dict[str, _summary.Summary]) -> Series:
        with_time = xkind == X_TIME
        named: list[tuple[str, Chunk | _summary.KeySummary]] = []
        for p in self._parts:
            name = p.path.name
            if name in summaries:
                found = summaries[name].get(key)
                if found is not None and found.points:
                    named.append((name, found))
            else:
                self._raw.move_to_end((name, key))
                named.append((name, self._raw[(name, key)]))
        tail = self._tail_chunk(key, with_time)
        if len(tail):
            named.append((_TAIL, tail))
        named = [(n, c) for n, c in named if _points(c)]
        spans = [_span(c, xkind) for _n, c in named]
        lo = min((s[0] for s in spans), default=np.inf)
        hi = max((s[1] for s in spans), default=-np.inf)
        width = bucket_width(hi - lo, target)
        for i, (name, entry) in enumerate(named):
            if isinstance(entry, _summary.KeySummary) and entry.buckets.width > width:  # too coarse: read the points
                part = next(p for p in self._parts if p.path.name == name)
                self._load([key], with_time, [part])
                named[i] = (name, self._raw[(name, key)])
        aggs = [entry.buckets.coarser(width) if isinstance(entry, _summary.KeySummary)
                else self._aggregate(name, key, entry, xkind, width) for name, entry in named]
        buckets = combine(aggs, width)
        points = sum(_points(c) for _n, c in named)
        nonfinite = sum(c.nonfinite if isinstance(c, _summary.KeySummary) else int((~np.isfinite(c.value)).sum())
                        for _n, c in named)
        by_rank = last_points([entry for _n, entry in named], xkind)
        last_value = last_x = None
        if by_rank:
            last_x = max(x for x, _v in by_rank.values())
            at_top = [v for x, v in by_rank.values() if x == last_x]
            last_value = float(sum(at_top) / len(at_top))
        return Series(key, xkind, buckets, (lo, hi), points, nonfinite, last_value, last_x,
                      {r: xv for r, xv in by_rank.items() if r >= 0})

    def _summary(self, part: Part) -> _summary.Summary | None:
        name = part.path.name
        if name not in self._summaries:
            self._summaries[name] = _summary.read_summary(open_part(self.files, part.path))
        return self._summaries[name]

    def _usable_summaries(self) -> dict[str, _summary.Summary]:
        """Parts drawn from their summaries (x = step): those that carry one (merged parts, and
        a run's last part when it is its only one: collector/_metrics_store.py)."""
        found = {p.path.name: self._summary(p) for p in self._parts}
        return {name: s for name, s in found.items() if s is not None}

    def _aggregate(self, name: str, key: str, chunk: Chunk, xkind: str, width: float) -> Buckets:
        if name == _TAIL:
            return aggregate(chunk.x(xkind), chunk.value, chunk.rank, width)
        cache_key = (name, key, xkind, width)
        found = self._aggs.get(cache_key)
        if found is None:
            finer = [k for k in self._aggs if k[:3] == (name, key, xkind) and k[3] < width]
            if finer:  # halve bucket numbers instead of touching the points again
                found = self._aggs[max(finer, key=lambda k: k[3])].coarser(width)
            else:
                found = aggregate(chunk.x(xkind), chunk.value, chunk.rank, width)
            self._aggs[cache_key] = found
        return found

    def _tail_chunk(self, key: str, with_time: bool) -> Chunk:
        if self._tail is None:
            return empty_chunk(with_time)
        cached = self._tail_chunks.get((key, with_time))
        if cached is None:
            cached = split_table(self._tail, [key], with_time)[key]
            self._tail_chunks[(key, with_time)] = cached
        return cached

    # --- loading parts ---------------------------------------------------------------------
    def _has(self, name: str, key: str, with_time: bool) -> bool:
        chunk = self._raw.get((name, key))
        return chunk is not None and (chunk.time is not None or not with_time)

    def _load(self, keys: list[str], with_time: bool, parts: list[Part]) -> None:
        for part in parts:
            name = part.path.name
            missing = [k for k in keys if not self._has(name, k, with_time)]
            if not missing:
                continue
            tiles = self._tiles(part, missing, with_time)
            skip = {k: sum(self._key_rows[(t, k)] for t in tiles) for k in missing}
            covered_to = self._ranges[tiles[-1]][1] if tiles else part.first - 1
            if tiles and covered_to == part.last:
                fresh: dict[str, Chunk | None] = {k: None for k in missing}
                self._rows[name] = sum(self._rows[t] for t in tiles)
                self._key_rows.update({(name, k): skip[k] for k in missing})
            else:
                fresh = self._read(part, missing, with_time, skip)
            for key in missing:
                pieces = [self._raw[(t, key)] for t in tiles]
                if fresh[key] is not None:
                    pieces.append(fresh[key])
                self._keep(name, key, concat_chunks(pieces) if len(pieces) != 1 else pieces[0])

    def _tiles(self, part: Part, keys: list[str], with_time: bool) -> list[str]:
        """Parts already held that fill `part`'s segment range from its start, in order."""
        if part.level == 0:
            return []
        candidates = sorted(
            (rng, name) for name, rng in self._ranges.items()
            if name != part.path.name and self._writers.get(name) == part.writer
            and part.first <= rng[0] and rng[1] <= part.last and name in self._rows
            and all(self._has(name, k, with_time) and (name, k) in self._key_rows for k in keys)
        )
        tiles, expect = [], part.first
        for (first, last), name in candidates:
            if first == expect:
                tiles.append(name)
                expect = last + 1
        return tiles

    def _read(self, part: Part, keys: list[str], with_time: bool, skip: dict[str, int]) -> dict[str, Chunk | None]:
        """Each key's points in `part` past the first `skip[key]` rows (held from its inputs)."""
        pf = open_part(self.files, part.path)
        self._rows[part.path.name] = pf.metadata.num_rows
        columns = [VALUE, STEP, RANK] + ([TIME] if with_time else [])
        self.reads += 1
        out: dict[str, Chunk | None] = {}
        for key, (table, rows) in read_keys(pf, keys, columns, skip).items():
            self._key_rows[(part.path.name, key)] = rows
            out[key] = one_key_chunk(table, with_time)
        return out

    def _keep(self, name: str, key: str, chunk: Chunk) -> None:
        old = self._raw.pop((name, key), None)
        if old is not None:
            self._raw_bytes -= old.nbytes
        self._raw[(name, key)] = chunk
        self._raw_bytes += chunk.nbytes

    def _forget_retired(self) -> None:
        """Drop parts merged away (they served as tiles already), then the least recently used past the budget."""
        current = {p.path.name for p in self._parts}
        for raw_key in [k for k in self._raw if k[0] not in current]:
            self._raw_bytes -= self._raw.pop(raw_key).nbytes
        while self._raw_bytes > self.budget and len(self._raw) > 1:
            _raw_key, evicted = self._raw.popitem(last=False)
            self._raw_bytes -= evicted.nbytes
        for agg_key in [k for k in self._aggs if k[0] not in current]:
            del self._aggs[agg_key]
        for name in [n for n in self._ranges if n not in current]:
            del self._ranges[name]
            self._rows.pop(name, None)
            for key in [k for k in self._key_rows if k[0] == name]:
                del self._key_rows[key]
            self._part_keys.pop(name, None)
            self._summaries.pop(name, None)
