"""Fixed run directories for the TUI tests: fixed ids, times, values; written the way the collector writes them."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from expman._storage.layout import CONFIG_YAML, METRICS_DIR, RUN_LOG, RUN_YAML, metrics_schema, part_name, write_yaml_atomic

T0 = 1_795_000_000.0  # 2026-11-18 08:26:40 UTC: every time in these runs counts from here
NOW = T0 + 3600.0  # the clock the app gets in snapshot tests


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def metrics_table(points: list[tuple[str, float | None, int | None, int, float]], host: str = "node01") -> pa.Table:
    """Rows (key, value, step, rank, time) in the storage schema."""
    keys = sorted({p[0] for p in points})
    return pa.Table.from_arrays(
        [
            pa.DictionaryArray.from_arrays(pa.array([keys.index(p[0]) for p in points], pa.int32()), pa.array(keys)),
            pa.array([p[1] for p in points], pa.float64()),
            pa.nulls(len(points), pa.string()),
            pa.array([p[2] for p in points], pa.int64()),
            pa.array([p[3] for p in points], pa.int32()),
            pa.DictionaryArray.from_arrays(pa.array([0] * len(points), pa.int32()), pa.array([host])),
            pa.array([int(p[4] * 1e6) for p in points], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        ],
        schema=metrics_schema(),
    )


def write_part(run_dir: Path, table: pa.Table, level: int = 0, first: int = 0, last: int = 0) -> Path:
    path = run_dir / METRICS_DIR / part_name(level, first, last, "test-host")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=131_072)
    return path


def training_points(steps: int, ranks: int = 1, scale: float = 1.0, slow_rank: int | None = None) -> list:
    points = []
    for step in range(steps):
        for rank in range(ranks):
            if slow_rank == rank and step >= steps * 0.8:
                continue
            t = T0 + step * 0.5 + rank * 0.01
            loss = scale * (2.0 * math.exp(-step / (steps / 4)) + 0.1 + 0.05 * math.sin(step / 3 + rank))
            acc = min(1.0, step / steps + 0.02 * rank)
            points.append(("loss", loss, step, rank, t))
            points.append(("acc", acc, step, rank, t))
            if step % 10 == 0:
                points.append(("lr", 1e-3 * (1 - step / steps), step, rank, t))
    return points


def write_hardware(run_dir: Path, rows: list) -> None:
    """Rows (seconds after T0, host, device, key, value, text, rank) as a hardware part, as the collector writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from expman._storage.layout import HARDWARE_DIR, hardware_schema, part_name

    def dictionary(values):
        names = sorted({v for v in values if v is not None})
        return pa.DictionaryArray.from_arrays(pa.array([None if v is None else names.index(v) for v in values],
                                                       pa.int32()), pa.array(names, pa.string()))

    table = pa.Table.from_arrays([
        pa.array([int((T0 + r[0]) * 1e6) for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        dictionary([r[1] for r in rows]), dictionary([r[2] for r in rows]), dictionary([r[3] for r in rows]),
        pa.array([r[4] for r in rows], pa.float64()), pa.array([r[5] for r in rows], pa.string()),
        pa.array([r[6] for r in rows], pa.int32()),
    ], schema=hardware_schema())
    folder = run_dir / HARDWARE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / part_name(0, 0, 0, "test-host"))


def make_run(root: Path, experiment: str, name: str, uid: str, *, status: str = "finished", start: float = T0,
             steps: int = 200, ranks: int = 1, params: dict[str, Any] | None = None, scale: float = 1.0,
             slow_rank: int | None = None, hosts: tuple[str, ...] = ("node01",), log_lines: int = 5) -> Path:
    run_dir = root / experiment / f"{name}-{uid}"
    run_dir.mkdir(parents=True)
    end = start + steps * 0.5
    rank_info = {}
    for r in range(ranks):
        last = steps - 1 if slow_rank != r else int(steps * 0.8) - 1
        rank_info[r] = {
            "host": hosts[r % len(hosts)], "pid": 1000 + r, "status": status,
            "started_at": iso(start), "ended_at": iso(end) if status != "running" else None,
            "last_heartbeat": iso(end if status != "running" else NOW - 1.0), "last_step": last,
        }
    info = {
        "id": uid, "name": name, "experiment": experiment, "status": status,
        "started_at": iso(start), "ended_at": iso(end) if status != "running" else None,
        "duration_s": round(end - start, 3) if status != "running" else None,
        "tags": [], "parent": None, "children": [], "world_size": ranks, "hosts": list(hosts), "ranks": rank_info,
        "software": {"expman": "0.1.0"},
    }
    if status == "failed":
        info["error"] = {"type": "ZeroDivisionError", "message": "division by zero",
                         "traceback": 'Traceback (most recent call last):\n  File "train.py", line 42, in <module>\n'
                                      "    loss = total / count\nZeroDivisionError: division by zero\n"}
    write_yaml_atomic(run_dir / RUN_YAML, info)
    write_yaml_atomic(run_dir / CONFIG_YAML, params or {"lr": 0.001, "batch_size": 64})
    with open(run_dir / RUN_LOG, "w", encoding="utf-8") as fh:
        for i in range(log_lines):
            fh.write(f"{iso(start + i)} [{hosts[0]}:0] INFO line {i} of {name}\n")
    write_part(run_dir, metrics_table(training_points(steps, ranks, scale, slow_rank), hosts[0]))
    return run_dir


def make_root(root: Path) -> dict[str, Path]:
    """Three runs of two experiments: the data every UI test and snapshot uses."""
    return {
        "baseline": make_run(root, "mnist", "baseline", "aaaa0001", start=T0, steps=200,
                             params={"lr": 0.001, "batch_size": 64, "optimizer": {"name": "adam", "beta": 0.9}}),
        "wide": make_run(root, "mnist", "wide", "aaaa0002", start=T0 + 600, steps=150, ranks=4, slow_rank=3,
                         status="running", scale=0.8, hosts=("node01", "node02"),
                         params={"lr": 0.003, "batch_size": 64, "optimizer": {"name": "adam", "beta": 0.95}}),
        "broken": make_run(root, "cifar", "resnet", "bbbb0001", start=T0 - 600, steps=50, status="failed"),
    }


@pytest.fixture(autouse=True)
def private_tui_state(tmp_path_factory, monkeypatch):
    """Each test remembers chart choices in its own state folder, never the user's (import it into a test module)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
