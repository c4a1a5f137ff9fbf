"""Hardware samples of a run, for the hardware panel.

The hardware issue adds `run.hardware()` (a pyarrow.Table in a long schema: time, host,
device, key, value, rank) and `<run>/hardware/*.parquet`. Until it lands, or for runs
without samples, `read_hardware` returns no series and the panel says so. A table that
is not in the long schema is read as wide (each numeric column a key) rather than refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

HARDWARE_DIR = "hardware"
SPARK_POINTS = 120  # the newest samples kept per series


@dataclass(frozen=True)
class HardwareSeries:
    host: str
    device: str
    key: str
    values: tuple[float, ...]  # oldest first, at most SPARK_POINTS

    @property
    def latest(self) -> float | None:
        return self.values[-1] if self.values else None


def load_table(run: Any) -> pa.Table | None:
    method = getattr(run, "hardware", None)
    if callable(method):
        try:
            table = method()
        except Exception:  # not ours to fix here: fall back to the files
            table = None
        if isinstance(table, pa.Table):
            return table
    folder = Path(run.path) / HARDWARE_DIR
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        return None
    import pyarrow.dataset as ds

    try:
        return ds.dataset([str(f) for f in files], format="parquet").to_table()
    except (pa.ArrowInvalid, OSError):
        return None


def read_hardware(run: Any) -> list[HardwareSeries]:
    table = load_table(run)
    if table is None or table.num_rows == 0:
        return []
    names = set(table.column_names)
    if {"key", "value"} <= names:
        return _long(table)
    return _wide(table)


def _text(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.array([""] * table.num_rows, pa.string())
    return pc.fill_null(table.column(name).cast(pa.string()), "")


def _long(table: pa.Table) -> list[HardwareSeries]:
    if "time" in table.column_names:
        table = table.sort_by("time")
    flat = pa.table({
        "host": _text(table, "host"),
        "device": _text(table, "device"),
        "key": _text(table, "key"),
        "value": table.column("value").cast(pa.float64()),
    })
    grouped = flat.group_by(["host", "device", "key"], use_threads=False).aggregate([("value", "list")])
    out = []
    for row in grouped.to_pylist():
        values = tuple(float(v) for v in row["value_list"][-SPARK_POINTS:] if v is not None)
        out.append(HardwareSeries(row["host"], row["device"], row["key"], values))
    out.sort(key=lambda s: (s.host, s.device, s.key))
    return out


def _wide(table: pa.Table) -> list[HardwareSeries]:
    if "time" in table.column_names:
        table = table.sort_by("time")
    hosts = _text(table, "host").to_pylist()
    out = []
    for name in table.column_names:
        column = table.column(name)
        if name in ("time", "rank") or not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            continue
        values = column.cast(pa.float64()).to_pylist()
        by_host: dict[str, list[float]] = {}
        for host, value in zip(hosts, values):
            if value is not None:
                by_host.setdefault(host, []).append(value)
        for host, vals in sorted(by_host.items()):
            out.append(HardwareSeries(host, "", name, tuple(vals[-SPARK_POINTS:])))
    return out
