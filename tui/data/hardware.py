"""Hardware samples of a run, for the hardware panel: one series per host, device, key and rank.

Read through `run.hardware()` (time, host, device, key, value, text, rank). A process
series is kept per rank (four ranks' `process.rss_bytes` are four series, not one
sawtooth), a GPU series per device. The whole run's history is reduced to SPARK_POINTS
buckets on time with the spike-keeping buckets of `expman._storage.buckets` (each
bucket's max is drawn, so a one-sample spike stays visible however long the run).
Units, families and scales for the panel are decided here too (`unit_of`, `family_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from expman._storage.buckets import aggregate, bucket_width

SPARK_POINTS = 48  # buckets of a whole run's history per series


@dataclass(frozen=True)
class HardwareSeries:
    host: str
    device: str
    key: str
    rank: int | None
    values: tuple[float, ...]  # each bucket's max over the whole run, oldest first, at most SPARK_POINTS
    latest: float | None
    low: float | None  # min and max over every sample
    high: float | None
    text: str = ""  # the latest text sample (gpu.name, gpu.count's reason), when the key has one

    @property
    def constant(self) -> bool:
        return self.low is not None and self.low == self.high


def unit_of(key: str) -> str:
    """The unit a key's name says (docs/storage.md: hardware keys)."""
    for suffix, unit in (("bytes_per_s", "B/s"), ("percent", "%"), ("bytes", "B"), ("_c", "°C"), ("_w", "W"),
                         ("_mhz", "MHz")):
        if key.endswith(suffix):
            return unit
    return ""


def family_of(key: str) -> tuple[str, str]:
    """Series drawn on one scale: the same first name part and unit (`memory.used_bytes` with
    `memory.total_bytes`, every `gpu.*_percent` together)."""
    return key.split(".", 1)[0], unit_of(key)


def read_hardware(run: Any) -> list[HardwareSeries]:
    """Every series of the run, sorted by host, device, key, rank; [] when nothing was sampled."""
    table = run.hardware()
    if table is None or table.num_rows == 0:
        return []
    return series_of(table)


def _column(table: pa.Table, name: str, fill: Any) -> list:
    if name not in table.column_names:
        return [fill] * table.num_rows
    column = table.column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    return pc.fill_null(column, fill).to_pylist()


def series_of(table: pa.Table) -> list[HardwareSeries]:
    time_us = table.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    value_col = table.column("value").cast(pa.float64())
    values = pc.fill_null(value_col, np.nan).to_numpy(zero_copy_only=False)
    texts = _column(table, "text", "")
    ranks = _column(table, "rank", -1)
    groups: dict[tuple[str, str, str, int], list[int]] = {}
    for i, group in enumerate(zip(_column(table, "host", ""), _column(table, "device", ""),
                                  _column(table, "key", ""), ranks)):
        groups.setdefault(group, []).append(i)
    out = []
    for (host, device, key, rank), rows in groups.items():
        idx = np.asarray(rows)
        order = idx[np.argsort(time_us[idx], kind="stable")]
        x, v = time_us[order], values[order]
        finite = np.isfinite(v)
        text = next((texts[i] for i in reversed(order.tolist()) if texts[i]), "")
        if not finite.any():
            out.append(HardwareSeries(host, device, key, None if rank < 0 else rank, (), None, None, None, text))
            continue
        x, v = x[finite], v[finite]
        width = bucket_width(float(x[-1] - x[0]), SPARK_POINTS)
        buckets = aggregate(x - x[0], v, np.zeros(len(v), np.int32), width)
        out.append(HardwareSeries(host, device, key, None if rank < 0 else int(rank), tuple(buckets.hi.tolist()),
                                  float(v[-1]), float(v.min()), float(v.max()), text))
    out.sort(key=lambda s: (s.host, s.device, s.key, -1 if s.rank is None else s.rank))
    return out
