"""The run directory: one owner for file names, column names and the Parquet schema.

The collector writes this layout, the reader and the CLI read it, and docs/storage.md
describes it. pyarrow is imported lazily so `import expman` stays light on ranks.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ._errors import ExpmanError

if TYPE_CHECKING:
    import pyarrow as pa

RUN_YAML = "run.yaml"
CONFIG_YAML = "config.yaml"
RUN_LOG = "run.log"
METRICS_DIR = "metrics"
ARTIFACTS_DIR = "artifacts"
WAL_DIR = ".wal"  # .wal/<writer>/NNNNNNNN.wal
HOSTS_DIR = "hosts"  # hosts/<writer>.yaml: the ranks, hosts and parameters other collectors hold
LOGS_DIR = "logs"  # logs/<writer>.log: run.log lines that other collectors received
OWNER_FILE = "owner"  # the name of the collector that writes run.yaml, config.yaml, run.log

# Metrics columns, one row per point.
KEY, VALUE, TEXT, STEP, RANK, HOST, TIME = "key", "value", "text", "step", "rank", "host", "time"
METRIC_COLUMNS = (KEY, VALUE, TEXT, STEP, RANK, HOST, TIME)

STATUSES = ("running", "finished", "failed", "killed", "crashed")
FINAL_STATUSES = frozenset(STATUSES[1:])

_NAME_LIMIT = 128
_BAD_NAME = re.compile(r"[/\\\x00-\x1f]")


def metrics_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(KEY, pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field(VALUE, pa.float64()),
            pa.field(TEXT, pa.string()),
            pa.field(STEP, pa.int64()),
            pa.field(RANK, pa.int32(), nullable=False),
            pa.field(HOST, pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field(TIME, pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


def check_name(what: str, name: str) -> str:
    """Experiment and run names become folder names: refuse anything that could escape."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    if len(name) > _NAME_LIMIT:
        raise ValueError(f"{what} name is longer than {_NAME_LIMIT} characters: {name[:40]!r}...")
    if name in (".", "..") or _BAD_NAME.search(name):
        raise ValueError(f"{what} name {name!r} may not contain path separators or control characters")
    return name


def run_dir_name(name: str, uid: str) -> str:
    return f"{name}-{uid}"


def write_yaml_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write a temp file beside the target, fsync, rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(data, fh, sort_keys=False, allow_unicode=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file ({} if the file is missing); ExpmanError if it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as exc:
        raise ExpmanError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExpmanError(f"{path} holds a {type(data).__name__}, not a mapping")
    return data


# --- metrics parts -----------------------------------------------------------------
# metrics/part-<level>-<first WAL segment>-<last WAL segment>.<writer>.parquet, where the
# writer is the collector that wrote it (its --name, the host name by default), so the
# collectors of several hosts can share one run folder on a shared filesystem. The
# segment range says which of that writer's write-ahead segments (.wal/<writer>/) a part
# holds, so a crash between writing a part and deleting its segments, or mid-merge,
# never counts a point twice.
_PART = re.compile(r"^part-(\d+)-(\d{8})-(\d{8})\.(.+)\.parquet$")


@dataclass(frozen=True, order=True)
class Part:
    writer: str
    first: int
    last: int
    level: int
    path: Path


def part_name(level: int, first: int, last: int, writer: str) -> str:
    return f"part-{level}-{first:08d}-{last:08d}.{writer}.parquet"


def list_parts(metrics_dir: Path, writer: str | None = None) -> list[Part]:
    """The parts that hold the data (of one writer, or all), oldest first; parts inside a
    wider one of the same writer are left out."""
    try:
        names = os.listdir(metrics_dir)
    except FileNotFoundError:
        return []
    parts = []
    for name in names:
        m = _PART.match(name)
        if m and (writer is None or m[4] == writer):
            parts.append(Part(m[4], int(m[2]), int(m[3]), int(m[1]), metrics_dir / name))
    return [p for p in sorted(parts) if not any(q is not p and _covers(q, p) for q in parts)]


def stale_parts(metrics_dir: Path, writer: str) -> list[Path]:
    """A writer's parts whose rows also sit in a wider part (an interrupted merge)."""
    live = {p.path for p in list_parts(metrics_dir, writer)}
    if not metrics_dir.exists():
        return []
    return [path for path in metrics_dir.glob(f"part-*.{writer}.parquet")
            if (m := _PART.match(path.name)) and m[4] == writer and path not in live]


def _covers(outer: Part, inner: Part) -> bool:
    wider = (outer.last - outer.first, outer.level) > (inner.last - inner.first, inner.level)
    return outer.writer == inner.writer and outer.first <= inner.first and inner.last <= outer.last and wider


# --- hardware samples ----------------------------------------------------------------
# hardware/part-<level>-<first flush>-<last flush>.<writer>.parquet: the same naming,
# listing and merge rules as metrics parts (`part_name`, `list_parts`, `stale_parts`), with
# the writer being the collector of the host sampled. Each collector writes only its own
# parts, so hosts that share a run folder never touch each other's samples.
HARDWARE_DIR = "hardware"
DEVICE = "device"
# Long schema, one row per reading; `device` is null for host-wide and process readings,
# `rank` is null for readings that belong to no rank of the run.
HARDWARE_COLUMNS = (TIME, HOST, DEVICE, KEY, VALUE, TEXT, RANK)


def hardware_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(TIME, pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field(HOST, pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field(DEVICE, pa.dictionary(pa.int32(), pa.string())),
            pa.field(KEY, pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field(VALUE, pa.float64()),
            pa.field(TEXT, pa.string()),
            pa.field(RANK, pa.int32()),
        ]
    )
