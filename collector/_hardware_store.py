"""One run's hardware samples from this host, as Parquet parts under `<run>/hardware/`.

Rows gather in memory and are written as a new part every few seconds; parts are merged
eight at a time, and into one when the run's sampling ends. Parts are named like metrics
parts, by their writer (this collector's name), and only this writer's parts are ever
touched, so the collectors of several hosts can share a run directory. Samples are not acknowledged to anyone: a collector crash loses at most
the rows since the last part.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from expman._storage.layout import HARDWARE_DIR, Part, hardware_schema, list_parts, part_name, stale_parts

from ._parts import merge_parts, next_merge, write_part

log = logging.getLogger("expman.collector")

_SCHEMA = hardware_schema()
_TIME = _SCHEMA.field("time").type

# One row: (key, value, device, rank, text); the time and host are per sample and per store.
Row = tuple[str, "float | None", "str | None", "int | None", "str | None"]


def _dictionary(values: list[Any]) -> pa.Array:
    return pa.array(values, pa.string()).dictionary_encode()


class HardwareStore:
    """`host` goes in the rows, `writer` (the collector's name) in the file names."""

    def __init__(self, run_dir: Path, host: str, writer: str) -> None:
        self.dir = run_dir / HARDWARE_DIR
        self.host = host
        self.writer = writer
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in stale_parts(self.dir, writer):  # left by an interrupted merge
            path.unlink(missing_ok=True)
        for tmp in self.dir.glob(f".part-*.{writer}.parquet.tmp"):
            tmp.unlink(missing_ok=True)
        self._next = max((p.last for p in list_parts(self.dir, writer)), default=-1) + 1
        self._times: list[int] = []
        self._rows: list[Row] = []
        self.rows_written = 0
        self.flushed_at = 0.0  # when the monitor last flushed, on its clock

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    def add(self, time_us: int, rows: list[Row]) -> None:
        self._times += [time_us] * len(rows)
        self._rows += rows

    def table(self) -> pa.Table:
        n = len(self._rows)
        keys, values, devices, ranks, texts = (list(column) for column in zip(*self._rows)) if n else ([], [], [], [], [])
        return pa.Table.from_arrays(
            [
                pa.array(self._times, _TIME),
                pa.DictionaryArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), n), pa.array([self.host], pa.string())),
                _dictionary(devices),
                _dictionary(keys),
                pa.array(values, pa.float64()),
                pa.array(texts, pa.string()),
                pa.array(ranks, pa.int32()),
            ],
            schema=_SCHEMA,
        )

    def flush(self) -> None:
        """Write the pending rows as a new part."""
        if not self._rows:
            return
        table = self.table()
        write_part(table, self.dir / part_name(0, self._next, self._next, self.writer), _SCHEMA)
        self._next += 1
        self.rows_written += table.num_rows
        self._times.clear()
        self._rows.clear()
        self._merge_levels()

    def _merge_levels(self) -> None:
        while (plan := next_merge(list_parts(self.dir, self.writer))) is not None:
            self._merge(*plan)

    def _merge(self, parts: list[Part], level: int) -> None:
        merge_parts(parts, level, _SCHEMA)

    def compact(self) -> None:
        """Flush, then merge this writer's parts into one (when the run's sampling ends)."""
        self.flush()
        parts = list_parts(self.dir, self.writer)
        if len(parts) > 1:
            self._merge(parts, max(p.level for p in parts) + 1)
