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
WAL_DIR = ".wal"

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
# metrics/part-<level>-<first WAL segment>-<last WAL segment>.parquet. The segment range
# says which write-ahead segments a part holds, so a crash between writing a part and
# deleting its segments, or mid-compaction, never counts a point twice.
_PART = re.compile(r"^part-(\d+)-(\d{8})-(\d{8})\.parquet$")


@dataclass(frozen=True, order=True)
class Part:
    first: int
    last: int
    level: int
    path: Path


def part_name(level: int, first: int, last: int) -> str:
    return f"part-{level}-{first:08d}-{last:08d}.parquet"


def list_parts(metrics_dir: Path) -> list[Part]:
    """The parts that hold the data, oldest first; parts inside a wider one are left out."""
    try:
        names = os.listdir(metrics_dir)
    except FileNotFoundError:
        return []
    parts = []
    for name in names:
        m = _PART.match(name)
        if m:
            parts.append(Part(int(m[2]), int(m[3]), int(m[1]), metrics_dir / name))
    return [p for p in sorted(parts) if not any(q is not p and _covers(q, p) for q in parts)]


def stale_parts(metrics_dir: Path) -> list[Path]:
    """Parts whose rows also sit in a wider part (left behind by an interrupted compaction)."""
    live = {p.path for p in list_parts(metrics_dir)}
    if not metrics_dir.exists():
        return []
    return [path for path in metrics_dir.glob("part-*.parquet") if _PART.match(path.name) and path not in live]


def _covers(outer: Part, inner: Part) -> bool:
    wider = (outer.last - outer.first, outer.level) > (inner.last - inner.first, inner.level)
    return outer.first <= inner.first and inner.last <= outer.last and wider


# --- hardware samples ----------------------------------------------------------------
# hardware/<host>-<level>-<first flush>-<last flush>.parquet, written by the collector of
# <host> (docs/storage.md). One collector per host writes only its own files, so hosts
# that share the run directory (a shared filesystem) never touch each other's samples.
HARDWARE_DIR = "hardware"
DEVICE = "device"
# Long schema, one row per reading; `device` is null for host-wide and process readings,
# `rank` is null for readings that belong to no rank of the run.
HARDWARE_COLUMNS = (TIME, HOST, DEVICE, KEY, VALUE, TEXT, RANK)
_HARDWARE_PART = re.compile(r"^(.+)-(\d+)-(\d{8})-(\d{8})\.parquet$")
_HOST_LABEL_BAD = re.compile(r"[^A-Za-z0-9._-]")


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


def host_label(host: str) -> str:
    """A host name as it appears in file names: letters, digits, '.', '_' and '-' only."""
    label = _HOST_LABEL_BAD.sub("_", host).lstrip(".")
    return label or "host"


def hardware_part_name(host: str, level: int, first: int, last: int) -> str:
    return f"{host_label(host)}-{level}-{first:08d}-{last:08d}.parquet"


@dataclass(frozen=True, order=True)
class HardwarePart:
    host: str  # the host label from the file name
    first: int
    last: int
    level: int
    path: Path


def _hardware_parts(hardware_dir: Path) -> list[HardwarePart]:
    try:
        names = os.listdir(hardware_dir)
    except FileNotFoundError:
        return []
    parts = []
    for name in names:
        m = _HARDWARE_PART.match(name)
        if m:
            parts.append(HardwarePart(m[1], int(m[3]), int(m[4]), int(m[2]), hardware_dir / name))
    return sorted(parts)


def list_hardware_parts(hardware_dir: Path, host: str | None = None) -> list[HardwarePart]:
    """The parts that hold the samples (of one host, or all), per host oldest first;
    parts whose range lies inside a wider part of the same host are left out."""
    parts = _hardware_parts(hardware_dir)
    if host is not None:
        parts = [p for p in parts if p.host == host_label(host)]
    return [p for p in parts if not any(q is not p and q.host == p.host and _covers(q, p) for q in parts)]  # type: ignore[arg-type]


def stale_hardware_parts(hardware_dir: Path, host: str) -> list[Path]:
    """One host's parts whose rows also sit in a wider part (an interrupted merge)."""
    live = {p.path for p in list_hardware_parts(hardware_dir, host)}
    return [p.path for p in _hardware_parts(hardware_dir) if p.host == host_label(host) and p.path not in live]
