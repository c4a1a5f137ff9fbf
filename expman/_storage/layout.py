"""The run directory: one owner for file names, column names and the Parquet schema.

The collector writes this layout, the reader and the CLI read it, and docs/storage.md
describes it. pyarrow is imported lazily so `import expman` stays light on ranks.
"""

from __future__ import annotations

import datetime as dt
import itertools

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import yaml

from expman._errors import ExpmanError
from expman._storage.files import LOCAL, Files
from expman._storage.yaml_emit import emit

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
DELIVERY_DIR = ".delivery"  # .delivery/<writer>.json: what a collector has applied, kept across its restarts

# Metrics columns, one row per point.
KEY, VALUE, TEXT, STEP, RANK, HOST, TIME = "key", "value", "text", "step", "rank", "host", "time"
METRIC_COLUMNS = (KEY, VALUE, TEXT, STEP, RANK, HOST, TIME)  # in the schema's order

STATUSES = ("running", "finished", "failed", "killed", "crashed")
FINAL_STATUSES = frozenset(STATUSES[1:])


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


def format_time(ts: float | None) -> str | None:
    """run.yaml's time format: ISO 8601 in UTC with milliseconds (None stays None)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch from a run.yaml time (an ISO string, or a datetime YAML
    already parsed); None for a missing or unreadable one. Naive times are UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        when = value
    else:
        try:
            when = dt.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def run_dir_name(name: str, uid: str) -> str:
    return f"{name}-{uid}"


def dump_yaml(data: dict[str, Any]) -> str:
    """The text `write_yaml_atomic` writes, keys in order: libyaml's block style (expman/_cli/
    listing.py reads this shape fast), from the fast emitter where it vouches for the same
    text, else from libyaml's dumper where installed (the same text as PyYAML's, ~8x less CPU)."""
    text = emit(data)
    if text is None:
        text = yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                         allow_unicode=True)
    return text


def write_yaml_atomic(path: Path, data: dict[str, Any], fsync: bool = True) -> None:
    """Write a temp file beside the target, fsync, rename: readers never see half a file."""
    write_text_atomic(path, dump_yaml(data), fsync)


def write_text_atomic(path: Path, text: str, fsync: bool = True) -> None:
    """`text` into a temp file beside `path`, renamed over it. `fsync=False` leaves the
    data to a commit that follows (the collector's group commit syncs the filesystem).
    The temp file is made with mode 0666 less the umask, like any new file; its name is
    this process's own (pid and a counter), so no name is drawn and none is tried twice."""
    tmp = path.parent / f".{path.name}.{os.getpid()}-{next(_TEMP_IDS)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileNotFoundError:  # the folder first (not every time: a collector rewrites files often)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    except FileExistsError:  # left by a dead process that had our pid
        tmp.unlink()
        fd = os.open(tmp, flags, 0o666)
    try:
        try:
            data = memoryview(text.encode("utf-8"))
            while data:
                data = data[os.write(fd, data):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_TEMP_IDS = itertools.count()


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: PurePath, files: Files = LOCAL) -> dict[str, Any]:
    """The mapping in a YAML file ({} if the file is missing); ExpmanError if it is not one."""
    data = read_yaml_if_present(path, files)
    return {} if data is None else data


def read_yaml_if_present(path: PurePath, files: Files = LOCAL) -> dict[str, Any] | None:
    """The mapping in a YAML file, None if the file is missing (one request on object
    storage, where a separate existence check would cost another)."""
    try:
        text = files.read_text(path)
    except FileNotFoundError:
        return None
    return parse_yaml_mapping(text, files.uri(path))


def parse_yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """The mapping in YAML text ({} if empty); ExpmanError naming `where` if it is not one."""
    try:
        data = yaml.load(text, Loader=_LOADER)  # libyaml's safe loader: ~10x the pure-Python one
    except yaml.YAMLError as exc:
        raise ExpmanError(f"{where} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExpmanError(f"{where} holds a {type(data).__name__}, not a mapping")
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
    path: PurePath  # a Path, except in runs read from object storage (expman/_storage/files.py)


def part_name(level: int, first: int, last: int, writer: str) -> str:
    return f"part-{level}-{first:08d}-{last:08d}.{writer}.parquet"


def list_parts(metrics_dir: PurePath, writer: str | None = None, files: Files = LOCAL) -> list[Part]:
    """The parts that hold the data (of one writer, or all), oldest first; parts inside a
    wider one of the same writer are left out."""
    parts = []
    for name in files.names(metrics_dir):
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


# --- artifacts ---------------------------------------------------------------------
# artifacts/manifest.yaml    append-only YAML sequence, one flow mapping per line;
#                            a later line for a name replaces an earlier one
# artifacts/manifest.<writer>.yaml   the same, from a collector that does not own the run
#                            (shared filesystem); readers merge them, the latest `time` wins
# artifacts/objects/ab/<sha256>        the plain bytes (not encrypted, not compressed)
# artifacts/objects/ab/<sha256>.expa   the expman container (expman/_storage/crypto.py)
# artifacts/.incoming/                 transfers in progress (collector only)
MANIFEST = "manifest.yaml"
OBJECTS_DIR = "objects"
INCOMING_DIR = ".incoming"
CONTAINER_SUFFIX = ".expa"
_OBJECT = re.compile(r"^objects/([0-9a-f]{2})/([0-9a-f]{64})(\.expa)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WRITER_MANIFEST = re.compile(r"^manifest\..*\.yaml$")  # manifest.<writer>.yaml (what glob("manifest.*.yaml") matched)


@dataclass(frozen=True)
class ArtifactRecord:
    """One manifest line: what a name points to and where the bytes are."""

    name: str
    size: int  # plaintext bytes
    sha256: str  # of the plaintext; also the object's file name
    time: str  # ISO 8601 UTC: when the rank called log_artifact
    rank: int
    host: str
    encrypted: bool
    compression: str  # "none" or "zstd" (chunks inside the container may still be stored plain)
    stored: int  # bytes of the object file
    object: str  # path relative to the artifacts folder

    def to_line(self) -> str:
        entry = {
            "name": self.name, "size": self.size, "sha256": self.sha256, "time": self.time,
            "rank": self.rank, "host": self.host, "encrypted": self.encrypted,
            "compression": self.compression, "stored": self.stored, "object": self.object,
        }
        # A flow mapping in JSON syntax: JSON is YAML, so the file stays a plain YAML list,
        # and a reader can take each line with json (50x faster than a YAML parser).
        return "- " + json.dumps(entry, ensure_ascii=False) + "\n"

    @classmethod
    def from_entry(cls, entry: Any) -> ArtifactRecord:
        """Check one parsed manifest entry; ExpmanError if it is malformed (a reader never
        follows an object path or name it has not checked)."""
        from expman._storage.artifact_names import normalize_name

        if not isinstance(entry, dict):
            raise ExpmanError(f"manifest entry is not a mapping: {entry!r}")
        try:
            record = cls(
                name=str(entry["name"]), size=int(entry["size"]), sha256=str(entry["sha256"]),
                time=str(entry["time"]), rank=int(entry["rank"]), host=str(entry.get("host", "")),
                encrypted=bool(entry["encrypted"]), compression=str(entry.get("compression", "none")),
                stored=int(entry.get("stored", 0)), object=str(entry["object"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExpmanError(f"malformed manifest entry {entry!r}: {exc}") from None
        if normalize_name(record.name) != record.name:
            raise ExpmanError(f"manifest entry has a name that is not normalized: {record.name!r}")
        match = _OBJECT.match(record.object)
        if not _SHA256.match(record.sha256) or not match or match[2] != record.sha256 or match[1] != record.sha256[:2]:
            raise ExpmanError(f"manifest entry for {record.name!r} names a bad object {record.object!r}")
        if bool(match[3]) != (record.encrypted or record.compression != "none"):
            raise ExpmanError(f"manifest entry for {record.name!r}: object {record.object!r} does not match its flags")
        return record


def object_name(sha256: str, container: bool) -> str:
    """The object's path relative to the artifacts folder."""
    return f"{OBJECTS_DIR}/{sha256[:2]}/{sha256}{CONTAINER_SUFFIX if container else ''}"


def manifest_name(writer: str | None = None) -> str:
    """The owner's manifest, or another writer's (shared filesystem: one file per writer)."""
    return MANIFEST if writer is None else f"manifest.{writer}.yaml"


def read_manifests(artifacts_dir: PurePath, files: Files = LOCAL) -> dict[str, ArtifactRecord]:
    """name -> latest record across every writer's manifest (by log time; within one file a
    later line wins)."""
    others = sorted(n for n in files.names(artifacts_dir) if _WRITER_MANIFEST.match(n))
    paths = [artifacts_dir / MANIFEST, *(artifacts_dir / n for n in others)]
    best: dict[str, tuple[str, int, ArtifactRecord]] = {}
    for order, path in enumerate(paths):
        for record in read_manifest(path, files).values():
            key = (record.time, order)
            if record.name not in best or key >= best[record.name][:2]:
                best[record.name] = (record.time, order, record)
    return {name: item[2] for name, item in best.items()}


def read_manifest(path: PurePath, files: Files = LOCAL) -> dict[str, ArtifactRecord]:
    """name -> latest record. Lines are parsed one at a time, so a torn last line (a
    collector killed mid-append) is skipped with a warning, never fatal."""
    import logging

    try:
        lines = files.read_text(path).splitlines()
    except FileNotFoundError:
        return {}
    records: dict[str, ArtifactRecord] = {}
    warn = logging.getLogger("expman").warning
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            try:
                entry = json.loads(line[2:]) if line.startswith("- {") else None
            except ValueError:
                entry = None
            if entry is None:  # written by hand or by another tool: any YAML one-item sequence line
                parsed = yaml.load(line, Loader=_LOADER)
                if not (isinstance(parsed, list) and len(parsed) == 1):
                    raise ExpmanError("not a one-item sequence line")
                entry = parsed[0]
            record = ArtifactRecord.from_entry(entry)
        except (yaml.YAMLError, ExpmanError) as exc:
            warn("expman: %s line %d skipped: %s", files.uri(path), number, exc)
            continue
        records[record.name] = record
    return records


# --- media (docs/storage.md, "Media") -------------------------------------------------
# media/index/<writer>-<first seq>-<last seq>.parquet       one row per image, audio clip, table
# media/histograms/<writer>-<first seq>-<last seq>.parquet  one row per histogram
# media/.journal/<writer>.jsonl   rows acknowledged but not yet in a part (readers add them)
# The media files themselves are objects in the artifact store (artifacts/objects/...).
MEDIA_DIR = "media"
MEDIA_INDEX_DIR = "index"
HISTOGRAMS_DIR = "histograms"
MEDIA_JOURNAL_DIR = ".journal"
MEDIA_KINDS = ("image", "video", "audio", "table", "histogram")
_MEDIA_FILE = re.compile(r"^artifacts/objects/([0-9a-f]{2})/([0-9a-f]{64})(\.expa)?$")


def media_part_name(writer: str, first: int, last: int) -> str:
    return f"{writer}-{first:012d}-{last:012d}.parquet"


def media_part_range(name: str) -> tuple[str, int, int] | None:
    """(writer, first, last) of a part's file name, or None for anything else."""
    match = re.match(r"^(.+)-(\d{12})-(\d{12})\.parquet$", name)
    return (match[1], int(match[2]), int(match[3])) if match else None


def check_media_file(path: str, sha256: str) -> str:
    """A media index's `file` column, checked before a reader follows it."""
    match = _MEDIA_FILE.match(path)
    if not match or match[2] != sha256 or match[1] != sha256[:2]:
        raise ExpmanError(f"media index names a bad file {path!r}")
    return path


def media_index_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        pa.field("key", pa.string(), nullable=False), pa.field(STEP, pa.int64()), pa.field(RANK, pa.int32()),
        pa.field(HOST, pa.string()), pa.field(TIME, pa.timestamp("us", tz="UTC")),
        pa.field("kind", pa.string()), pa.field("format", pa.string()), pa.field("file", pa.string()),
        pa.field("sha256", pa.string()), pa.field("size", pa.int64()), pa.field("encrypted", pa.bool_()),
        pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("channels", pa.int32()),
        pa.field("caption", pa.string()), pa.field("sample_rate", pa.int32()), pa.field("frames", pa.int64()),
        pa.field("rows", pa.int64()), pa.field("columns", pa.int32()), pa.field("fps", pa.float64()),
        pa.field("seq", pa.int64()),
    ])


def histograms_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        pa.field("key", pa.string(), nullable=False), pa.field(STEP, pa.int64()), pa.field(RANK, pa.int32()),
        pa.field(HOST, pa.string()), pa.field(TIME, pa.timestamp("us", tz="UTC")),
        pa.field("edges", pa.list_(pa.float64())), pa.field("counts", pa.list_(pa.float64())),
        pa.field("count", pa.int64()), pa.field("nonfinite", pa.int64()),
        pa.field("min", pa.float64()), pa.field("max", pa.float64()), pa.field("sum", pa.float64()),
        pa.field("seq", pa.int64()),
    ])
