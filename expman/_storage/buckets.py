"""Reduce points to buckets that keep spikes: min, max, sum and count per (rank, bucket).

Buckets sit on a fixed grid: bucket b covers [b*w, (b+1)*w) with w a power of two, so
the aggregate of a chunk of points depends only on the chunk and w. That makes it
cacheable per immutable Parquet part, and a coarser grid (2w) follows from a finer one
by halving bucket numbers, without touching the points again. No Python loops over
points: numpy's bincount and minimum/maximum.at do the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Buckets:
    """Aggregates per (rank, bucket), sorted by rank then bucket. rank is -1 when reduced over ranks."""

    width: float
    rank: np.ndarray  # int32
    bucket: np.ndarray  # int64
    lo: np.ndarray  # float64
    hi: np.ndarray
    total: np.ndarray
    count: np.ndarray  # int64

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    def __len__(self) -> int:
        return len(self.bucket)

    def ranks(self) -> list[int]:
        return sorted({int(r) for r in np.unique(self.rank)})

    def of_rank(self, rank: int) -> Buckets:
        sel = self.rank == rank
        return Buckets(self.width, self.rank[sel], self.bucket[sel], self.lo[sel], self.hi[sel],
                       self.total[sel], self.count[sel])

    def coarser(self, width: float) -> Buckets:
        """The same points on a grid `width` (a power-of-two multiple of ours)."""
        factor = int(round(width / self.width))
        if factor <= 1:
            return self
        return _group(self.rank, self.bucket // factor, self.lo, self.hi, self.total, self.count, width)

    def across_ranks(self) -> Buckets:
        """All ranks folded into one series (rank -1): mean over every point, min-max band."""
        return _group(np.full(len(self.bucket), -1, np.int32), self.bucket, self.lo, self.hi, self.total,
                      self.count, self.width)


def empty(width: float) -> Buckets:
    return Buckets(width, np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty(0),
                   np.empty(0, np.int64))


def bucket_width(span: float, target: int, minimum: float = 1.0) -> float:
    """The smallest power of two >= span/target (and >= minimum): a stable grid for a growing run."""
    if not math.isfinite(span) or span <= 0 or target <= 0:
        return minimum
    width = 2.0 ** math.ceil(math.log2(span / target))
    return max(width, minimum)


def aggregate(x: np.ndarray, value: np.ndarray, rank: np.ndarray, width: float) -> Buckets:
    """Bucket raw points (x and value float64, rank int32); points with non-finite x or value are left out."""
    ok = np.isfinite(x) & np.isfinite(value)
    if not ok.all():
        x, value, rank = x[ok], value[ok], rank[ok]
    if len(x) == 0:
        return empty(width)
    scaled = x * (1.0 / width)  # exact: width is a power of two
    bucket = scaled.astype(np.int64) if scaled[0] >= 0 and scaled.min() >= 0 else np.floor(scaled).astype(np.int64)
    if rank[0] == rank[-1] and (rank == rank[0]).all() and (bucket[1:] >= bucket[:-1]).all():
        return _runs(int(rank[0]), bucket, value, width)
    return _blocks(rank, bucket, value, width)


_BLOCK = 1 << 16


def _blocks(rank: np.ndarray, bucket: np.ndarray, value: np.ndarray, width: float) -> Buckets:
    """Several ranks (or x out of order): accumulate block by block into one (rank, bucket) grid.

    Blocks keep the temporaries in cache; the grid is small (ranks x buckets in range).
    """
    rmin, rmax = int(rank.min()), int(rank.max())
    bmin, bmax = int(bucket.min()), int(bucket.max())
    nb = bmax - bmin + 1
    cells = (rmax - rmin + 1) * nb
    if cells > 4 * len(bucket) + 4096:  # sparse grid (many ranks, few points): group directly
        return _group(rank, bucket, value, value, value, None, width)
    count = np.zeros(cells, np.int64)
    total = np.zeros(cells)
    lo = np.full(cells, np.inf)
    hi = np.full(cells, -np.inf)
    for start in range(0, len(bucket), _BLOCK):
        end = start + _BLOCK
        gid = (rank[start:end] - rmin).astype(np.int64)
        gid *= nb
        gid += bucket[start:end]
        gid -= bmin
        v = value[start:end]
        count += np.bincount(gid, minlength=cells)
        np.add.at(total, gid, v)
        np.minimum.at(lo, gid, v)
        np.maximum.at(hi, gid, v)
    present = np.flatnonzero(count)
    return Buckets(width, (present // nb + rmin).astype(np.int32), present % nb + bmin, lo[present], hi[present],
                   total[present], count[present])


def _runs(rank: int, bucket: np.ndarray, value: np.ndarray, width: float) -> Buckets:
    """The common case, one rank with x in order: reduce each run of equal buckets in place."""
    starts = np.concatenate(([0], np.flatnonzero(bucket[1:] != bucket[:-1]) + 1))
    count = np.diff(np.concatenate((starts, [len(bucket)])))
    return Buckets(width, np.full(len(starts), rank, np.int32), bucket[starts], np.minimum.reduceat(value, starts),
                   np.maximum.reduceat(value, starts), np.add.reduceat(value, starts), count.astype(np.int64))


def combine(parts: list[Buckets], width: float) -> Buckets:
    """Merge aggregates of several chunks (each on a grid no coarser than `width`)."""
    parts = [p.coarser(width) for p in parts if len(p)]
    if not parts:
        return empty(width)
    if len(parts) == 1:
        return parts[0]
    cat = [np.concatenate([getattr(p, f) for p in parts]) for f in ("rank", "bucket", "lo", "hi", "total", "count")]
    return _group(*cat, width)


def _group(rank: np.ndarray, bucket: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: np.ndarray,
           count: np.ndarray | None, width: float) -> Buckets:
    """Group rows by (rank, bucket): min of lo, max of hi, sums of total and count (None: 1 a row)."""
    rmin, rmax = int(rank.min()), int(rank.max())
    bmin, bmax = int(bucket.min()), int(bucket.max())
    nb = bmax - bmin + 1
    cells = (rmax - rmin + 1) * nb
    if cells > 4 * len(bucket) + 4096:  # sparse: compact the ids first (rare: many ranks, few points)
        gid = (rank.astype(np.int64) - rmin) * nb + (bucket - bmin)
        uniq, gid = np.unique(gid, return_inverse=True)
        cells = len(uniq)
    else:
        gid = (rank.astype(np.int64) - rmin) * nb + (bucket - bmin)
        uniq = None
    n = np.bincount(gid, minlength=cells) if count is None else np.bincount(gid, weights=count, minlength=cells)
    s = np.zeros(cells)
    np.add.at(s, gid, total)
    mn = np.full(cells, np.inf)
    np.minimum.at(mn, gid, lo)
    mx = np.full(cells, -np.inf)
    np.maximum.at(mx, gid, hi)
    present = np.flatnonzero(n > 0)
    ids = uniq[present] if uniq is not None else present
    return Buckets(
        width,
        (ids // nb + rmin).astype(np.int32),
        (ids % nb + bmin).astype(np.int64),
        mn[present],
        mx[present],
        s[present],
        n[present].astype(np.int64),
    )
