"""Runs in a bucket: copy the run folders a collector stages on local disk to object storage.

With a URI root (`--root s3://bucket/prefix`; gs://, abfs://, hdfs://: whatever pyarrow.fs
opens) the collector writes every run into a staging folder on local disk exactly as it
writes a local root (write-ahead log, acknowledgements, parts and merges unchanged), and
a BucketMirror thread copies what changed to the bucket in batches. The rules, which
docs/storage.md ("Runs in a bucket") explains:

- Sealed files (Parquet parts, artifact objects, media parts) are immutable objects under
  their own names, so an upload repeated after a crash or an outage writes the same object
  again. A writer's part that a wider part of its own covers is deleted from the bucket
  only once that wider part is there (readers skip covered parts meanwhile).
- The owner of a run in the bucket is the collector that holds rank 0 (pyarrow.fs has no
  conditional create; this rule needs no request and no race). It uploads run.yaml,
  config.yaml and run.log; every other writer uploads its run.log as logs/<writer>.log and
  its manifest as artifacts/manifest.<writer>.yaml. Every writer uploads
  hosts/<writer>.yaml and downloads the others', which its collector folds into the
  staged run (as on a shared filesystem), so each host sees the run's status.
- A yaml that says a rank ended goes up only once this writer's write-ahead log is empty:
  a reader that sees a run finished sees all its points.
- Once the collector has closed a finished run and a pass found all of it in the bucket,
  its staging folder goes (`release`); a tombstone `<experiment>/<run folder>.uploaded`
  says where it went and which frames it took, so late frames are answered, never stored.

The thread never touches the collector's loop: an unreachable bucket only delays uploads
(retried with backoff) while the staging folder grows on local disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from expman._storage.files import Files, locate, shown
from expman._storage.layout import (
    ARTIFACTS_DIR,
    CONFIG_YAML,
    DELIVERY_DIR,
    FINAL_STATUSES,
    HARDWARE_DIR,
    HOSTS_DIR,
    LOGS_DIR,
    MANIFEST,
    METRICS_DIR,
    OBJECTS_DIR,
    OWNER_FILE,
    RUN_LOG,
    RUN_YAML,
    WAL_DIR,
    list_parts,
    manifest_name,
    write_yaml_atomic,
)

log = logging.getLogger("expman.collector")

UPLOAD_INTERVAL_S = 10.0  # a run's changes go up at most this often (or at once past UPLOAD_BATCH_BYTES, or at its end)
UPLOAD_BATCH_BYTES = 64 << 20
REQUEST_TIMEOUT_S = 10.0  # a request that hears nothing this long fails the pass, which is retried with backoff
REQUEST_ATTEMPTS = 2  # the SDK's own retries of one request (for a throttled or flaky store)
CONNECT_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0
CLOSE_TIMEOUT_S = 30.0  # at exit, how long the last pass may take before pending uploads wait for the next start
# A covered part stays this long after its wider part went up: a reader that listed the narrower
# parts just before reads them to the end (object stores hold no open file the way a disk does).
RETIRE_AFTER_S = 30.0
RETIRE_AT_EXIT_S = 2.0  # the same at exit, short: a local-mode collector has seconds to leave
BIG_LOG_BYTES = 1 << 20  # logs past this go up at most every interval x (size / BIG_LOG_BYTES): bounded bandwidth
IDLE_CHECK_INTERVALS = 6  # an ended run that is all up is looked at every 6 intervals (late frames)
_CHUNK = 1 << 20  # uploads stream in 1 MiB chunks: no file is ever held whole in memory
_PART_DIRS = (METRICS_DIR, HARDWARE_DIR)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
UPLOADED = ".uploaded"  # <experiment>/<run folder>.uploaded: the tombstone of a staged run all in the bucket
_TRASH = ".removing"  # a released run folder is moved here first (one rename), then deleted


def open_bucket(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem for `uri` and the root's path in it. S3 gets request and connect
    timeouts, so an unreachable store fails a pass instead of hanging it, and delayed opens,
    so a small object is one PUT; credentials and endpoint come from the standard
    environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...) as for readers."""
    files, path = locate(uri)
    filesystem = getattr(files, "filesystem", None)
    if filesystem is None:
        raise ValueError(f"{shown(uri)} is not object storage")
    if filesystem.type_name == "s3":
        rebuild, (options,) = filesystem.__reduce__()
        import pyarrow.fs as pafs

        filesystem = rebuild({**options, "request_timeout": REQUEST_TIMEOUT_S, "connect_timeout": CONNECT_TIMEOUT_S,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=REQUEST_ATTEMPTS),
                              # one PUT per object below the multipart size, not create + part + complete
                              "allow_delayed_open": True})
    return filesystem, str(path).rstrip("/")


def tombstone(run_dir: Path) -> Path:
    """Where a released run's tombstone lies: beside its folder, `<run folder>.uploaded`."""
    return run_dir.with_name(run_dir.name + UPLOADED)


def remove_released(staging: Path, run_dir: Path) -> None:
    """Delete a released run's staging folder: renamed out of the staging tree first, then removed."""
    trash = staging / _TRASH
    shutil.rmtree(trash, ignore_errors=True)  # what a kill left there
    trash.mkdir()
    try:
        os.rename(run_dir, trash / run_dir.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


class _Names(Files):
    """A listing already in memory, for layout.list_parts (which parts a wider one covers)."""

    def __init__(self, names: list[str]) -> None:
        self._names = names

    def names(self, path: Any) -> list[str]:
        return self._names


def covered_parts(names: list[str]) -> list[str]:
    """The part names (of one folder) whose rows a wider part of the same writer holds."""
    live = {p.path.name for p in list_parts(PurePosixPath("."), files=_Names(names))}
    return [n for n in names if n.startswith("part-") and n not in live]


def _ended(data: bytes) -> tuple[frozenset[Any], bool]:
    """The ranks a run.yaml or hosts/<writer>.yaml says have ended, and whether the run has."""
    try:
        info = yaml.load(data, Loader=_LOADER)
    except yaml.YAMLError:
        return frozenset(), False
    if not isinstance(info, dict):
        return frozenset(), False
    ranks = info.get("ranks") or {}
    done = frozenset(r for r, v in ranks.items() if isinstance(v, dict) and v.get("status") not in (None, "running"))
    return done, info.get("status") in FINAL_STATUSES


@dataclass
class _RunState:
    """What the mirror knows of one staged run's copy in the bucket."""

    dir: Path
    remote: str
    uploaded: dict[str, int] | None = None  # immutable objects in the bucket: relative name -> size
    sent: dict[str, tuple[int, int]] = field(default_factory=dict)  # mutable file -> (size, mtime_ns) uploaded
    sent_at: dict[str, float] = field(default_factory=dict)  # ... and when (big logs go up less often)
    ended: dict[str, tuple[frozenset[Any], bool]] = field(default_factory=dict)  # what the uploaded yaml said
    fetched: dict[str, tuple[int, float]] = field(default_factory=dict)  # others' hosts/*.yaml downloaded
    covered_since: dict[str, float] = field(default_factory=dict)  # parts in the bucket a wider one covers
    owner: bool = False  # rank 0 is ours: run.yaml, config.yaml, run.log go up
    other_owner: bool = False  # another writer has rank 0: our run.log goes up as logs/<writer>.log
    snapshot: tuple[Any, ...] = ()  # the local files as of the last complete pass
    passed_at: float = float("-inf")
    listed_at: float = float("-inf")
    final: bool = False
    checked_at: float = float("-inf")


class BucketMirror:
    """Copies every staged run under `staging` to `uri` on its own thread (see the module doc)."""

    def __init__(self, uri: str, staging: Path, writer: str, *, interval: float = UPLOAD_INTERVAL_S,
                 batch_bytes: int = UPLOAD_BATCH_BYTES) -> None:
        self.uri = uri
        self.staging = staging
        self.writer = writer
        self.interval = interval
        self.batch_bytes = batch_bytes
        self.retire_after = RETIRE_AFTER_S
        self.requests: Counter[str] = Counter()  # put, get, list, delete; bytes_up, bytes_down
        self.failures = 0
        self.pending = 0  # runs whose last visit left something for a later pass
        self._fs: Any = None
        self._base = ""
        self._runs: dict[Path, _RunState] = {}
        self._failed_last: Path | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expman-bucket", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """One last pass over every run (the collector has closed them), then the thread ends;
        False if something is still to upload (the next start with this staging folder does it)."""
        self._stop.set()
        self._thread.join()
        self.retire_after = min(self.retire_after, RETIRE_AT_EXIT_S)
        deadline = time.monotonic() + timeout
        while True:
            if self.upload_pass(force=True):
                return True
            wait = max(self._backoff, 0.2)
            if time.monotonic() + wait > deadline:
                log.warning("bucket %s: uploads still pending at exit; they resume when a collector starts with "
                            "staging folder %s", shown(self.uri), self.staging)
                return False
            time.sleep(wait)

    # --- the thread -------------------------------------------------------------------
    def _loop(self) -> None:
        tick = min(1.0, self.interval / 2)
        while not self._stop.wait(tick):
            if time.monotonic() >= self._retry_at:
                self.upload_pass(force=False)

    def upload_pass(self, force: bool) -> bool:
        """Visit every staged run (`force`: upload what changed now, whatever the interval);
        True when all went up (or had nothing new). The thread calls it; so can a test."""
        self.pending = 0
        run_dir = None
        try:
            if self._fs is None:
                self._fs, self._base = open_bucket(self.uri)
            staged = self._staged()
            if self._failed_last in staged:  # a run that fails on its own does not hold the others back
                staged.append(staged.pop(staged.index(self._failed_last)))
            for run_dir in staged:
                state = self._runs.get(run_dir)
                if state is None:
                    rel = run_dir.relative_to(self.staging).as_posix()
                    state = self._runs[run_dir] = _RunState(run_dir, f"{self._base}/{rel}")
                self._visit(state, force)
        except Exception as exc:  # the store is unreachable or refuses: keep the staging copy, retry later
            self.failures += 1
            self._failed_last = run_dir
            report = log.warning if not self._backoff else log.debug  # once an outage, and when it ends
            self._backoff = min(MAX_BACKOFF_S, max(0.5, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            report("bucket %s: upload failed (%s); retrying in %.1f s", shown(self.uri),
                   " ".join(str(exc).split())[:300] or type(exc).__name__, self._backoff)
            return False
        if self._backoff:
            log.warning("bucket %s: uploads resumed", shown(self.uri))
        self._backoff = 0.0
        self._failed_last = None
        return not self.pending

    def _staged(self) -> list[Path]:
        """Run folders in the staging root: <experiment>/<run>/ with this writer's hosts file
        (a released run's leftovers, if a kill interrupted its removal, are not one)."""
        runs = (p.parent.parent for p in self.staging.glob(f"*/*/{HOSTS_DIR}/{self.writer}.yaml"))
        return sorted(r for r in runs if not tombstone(r).exists())

    # --- staged runs all in the bucket ------------------------------------------------
    def all_up(self, run_dir: Path) -> bool:
        """True when the run has ended and the last complete pass over it uploaded what its
        staging folder holds now (retired parts deleted, no yaml waiting)."""
        state = self._runs.get(run_dir)
        if state is None or not state.final or not state.snapshot:
            return False
        if self._snapshot(state)[0] == state.snapshot:
            return True
        state.checked_at = float("-inf")  # it changed after that pass: the next pass looks at it
        return False

    def release(self, run_dir: Path) -> dict[str, Any] | None:
        """Replace the staging folder of a run the collector has closed by its tombstone, if
        all of it is in the bucket; returns the tombstone's record (None: not yet). The bucket
        is not touched. Called on the collector's thread: the folder leaves by one rename, so
        a pass of the mirror's thread sees all of it or none."""
        if not self.all_up(run_dir):
            return None
        info = yaml.load((run_dir / RUN_YAML).read_bytes(), Loader=_LOADER)
        try:  # which frames the run took (the collector wrote it as it closed the run): resends are duplicates
            windows = json.loads((run_dir / DELIVERY_DIR / f"{self.writer}.json").read_text()).get("windows", {})
        except (OSError, ValueError):
            windows = {}
        uid = info["id"]
        record = {"id": uid, "location": f"{shown(self.uri).rstrip('/')}/{run_dir.relative_to(self.staging).as_posix()}",
                  "windows": windows}
        write_yaml_atomic(tombstone(run_dir), record)  # first: a kill from here on leaves a run that is not staged
        self._runs.pop(run_dir, None)
        remove_released(self.staging, run_dir)
        log.info("run %s is all in the bucket (%s); its staging folder is removed", uid, record["location"])
        return record

    def ended(self) -> dict[str, Path]:
        """Staged runs that have ended (a collector closed them before it stopped): run id -> folder."""
        out = {}
        for run_dir in self._staged():
            try:
                info = yaml.load((run_dir / RUN_YAML).read_bytes(), Loader=_LOADER)
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(info, dict) and info.get("status") in FINAL_STATUSES and isinstance(info.get("id"), str):
                out[info["id"]] = run_dir
        return out

    def released(self) -> list[dict[str, Any]]:
        """The tombstones' records (the collector answers late frames of those runs from
        them), after finishing any removal a kill interrupted."""
        records = []
        for path in sorted(self.staging.glob(f"*/*{UPLOADED}")):
            try:
                record = yaml.load(path.read_bytes(), Loader=_LOADER) if path.is_file() else None
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records.append(record)
                remove_released(self.staging, path.with_name(path.name[:-len(UPLOADED)]))
        shutil.rmtree(self.staging / _TRASH, ignore_errors=True)
        return records

    # --- one run ----------------------------------------------------------------------
    def _visit(self, state: _RunState, force: bool) -> None:
        now = time.monotonic()
        if state.final and state.snapshot and not force and now - state.checked_at < IDLE_CHECK_INTERVALS * self.interval:
            return  # an ended run all up: only late frames could change it, looked at now and then
        state.checked_at = now
        snapshot, new_bytes = self._snapshot(state)
        changed = snapshot != state.snapshot
        final = self._locally_final(state)
        due = changed and (force or now - state.passed_at >= self.interval or new_bytes >= self.batch_bytes
                           or (final and not state.final))
        if due:
            complete = self._upload(state)
            state.passed_at, state.final = now, final
            state.snapshot = snapshot if complete else ()  # something waits (a deferred yaml): look again
            self.pending += not complete
        if not final and (due or now - state.listed_at >= self.interval):
            self._fetch_hosts(state)  # the other writers' ranks: the collector folds them (status, params)
            state.listed_at = now

    def _snapshot(self, state: _RunState) -> tuple[tuple[Any, ...], int]:
        """(name, size, mtime) of every file to mirror, and the bytes of sealed files not yet up."""
        items = []
        new_bytes = 0
        for rel, path in self._local_files(state.dir, objects=False):  # a new object comes with a manifest line
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            items.append((rel, st.st_size, st.st_mtime_ns))
            if state.uploaded is not None and not self._mutable(rel) and state.uploaded.get(rel) != st.st_size:
                new_bytes += st.st_size
        return tuple(items), new_bytes

    def _locally_final(self, state: _RunState) -> bool:
        try:
            data = (state.dir / RUN_YAML).read_bytes()
        except FileNotFoundError:
            return False
        return _ended(data)[1] and not self._wal_busy(state.dir)

    def _local_files(self, run_dir: Path, objects: bool = True) -> list[tuple[str, Path]]:
        """Relative name and path of each file to mirror (`objects`: artifact objects too):
        hidden entries (.wal, .delivery, .incoming, temp files), the local owner file and
        other writers' hosts files stay here."""
        out = []
        for folder, dirs, names in os.walk(run_dir):
            rel_folder = Path(folder).relative_to(run_dir).as_posix()
            skip = () if objects else (f"{ARTIFACTS_DIR}/{OBJECTS_DIR}",)
            dirs[:] = [d for d in dirs if not d.startswith(".") and f"{rel_folder}/{d}".removeprefix("./") not in skip]
            for name in names:
                rel = name if rel_folder == "." else f"{rel_folder}/{name}"
                if name.startswith(".") or rel == OWNER_FILE or (rel_folder == HOSTS_DIR and name != f"{self.writer}.yaml"):
                    continue
                out.append((rel, Path(folder) / name))
        return sorted(out)

    def _mutable(self, rel: str) -> bool:
        return rel in (RUN_YAML, CONFIG_YAML, RUN_LOG, f"{ARTIFACTS_DIR}/{MANIFEST}", f"{HOSTS_DIR}/{self.writer}.yaml")

    def _wal_busy(self, run_dir: Path) -> bool:
        """Rows in this writer's write-ahead log that no part holds yet."""
        try:
            return any(e.stat().st_size > 0 for e in os.scandir(run_dir / WAL_DIR / self.writer) if e.name.endswith(".wal"))
        except FileNotFoundError:
            return False

    def _upload(self, state: _RunState) -> bool:
        """Sealed files first, then retire covered parts, then the yaml and logs that point at
        them; False if a file had to wait for a later pass."""
        if state.uploaded is None:
            state.uploaded = self._list_remote(state.remote)
        self._decide_owner(state)
        wal_busy = self._wal_busy(state.dir)
        complete = True
        while True:  # a part merged away mid-pass: its wider part is new, list again
            vanished = False
            for rel, path in self._local_files(state.dir):
                if self._mutable(rel):
                    continue
                try:
                    size = path.stat().st_size
                    if state.uploaded.get(rel) != size:
                        self._put_file(path, f"{state.remote}/{rel}")
                        state.uploaded[rel] = size
                except FileNotFoundError:
                    vanished = True
            if not vanished:
                break
        for folder in _PART_DIRS:
            names = [rel.split("/", 1)[1] for rel in state.uploaded if rel.startswith(f"{folder}/") and rel.count("/") == 1
                     and rel.endswith(f".{self.writer}.parquet")]
            for name in covered_parts(names):
                rel = f"{folder}/{name}"
                since = state.covered_since.setdefault(rel, time.monotonic())
                if time.monotonic() - since < self.retire_after:
                    complete = False  # retired by a later pass
                    continue
                self._delete(f"{state.remote}/{rel}")
                del state.uploaded[rel]
                del state.covered_since[rel]
        targets = self._mutable_targets(state)
        complete = complete and len(targets) > 1  # run.log and the manifest wait for the owner to be known
        for rel, target in targets:
            path = state.dir / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if state.sent.get(target) == (st.st_size, st.st_mtime_ns):
                continue
            if rel.endswith(".log") and st.st_size > BIG_LOG_BYTES and target in state.sent and not self._locally_final(state):
                if time.monotonic() - state.sent_at.get(target, 0.0) < self.interval * st.st_size / BIG_LOG_BYTES:
                    complete = False
                    continue
            if rel in (RUN_YAML, f"{HOSTS_DIR}/{self.writer}.yaml"):
                data = path.read_bytes()
                ended = _ended(data)
                if wal_busy and ended != state.ended.get(target, (frozenset(), False)):
                    complete = False
                    continue  # says a rank ended while its last rows are not in a part yet: next pass
                self._put_bytes(data, f"{state.remote}/{target}")
                state.ended[target] = ended
            else:
                self._put_file(path, f"{state.remote}/{target}")
            state.sent[target] = (st.st_size, st.st_mtime_ns)
            state.sent_at[target] = time.monotonic()
        if state.owner and OWNER_FILE not in state.sent:
            self._put_bytes(f"{self.writer}\n".encode(), f"{state.remote}/{OWNER_FILE}")
            state.sent[OWNER_FILE] = (0, 0)
        return complete

    def _decide_owner(self, state: _RunState) -> None:
        """Owner: rank 0 is ours. Not: another writer's hosts file has it. Until one of them
        is known (or the run has ended), run.log and the manifest wait, so they never go up
        under the wrong name."""
        if state.owner or state.other_owner:
            return
        for path in (state.dir / HOSTS_DIR).glob("*.yaml"):
            try:
                ranks = (yaml.load(path.read_bytes(), Loader=_LOADER) or {}).get("ranks") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if 0 in ranks:
                state.owner = path.stem == self.writer
                state.other_owner = not state.owner
                return

    def _mutable_targets(self, state: _RunState) -> list[tuple[str, str]]:
        """(local file, object name) of the files rewritten while a run lives, in upload order:
        run.yaml last, so a reader that sees a status sees what it stands for."""
        manifest = f"{ARTIFACTS_DIR}/{MANIFEST}"
        hosts = f"{HOSTS_DIR}/{self.writer}.yaml"
        if not (state.owner or state.other_owner or self._locally_final(state)):
            return [(hosts, hosts)]  # whose run.log this is, is not known yet
        if state.owner:
            return [(RUN_LOG, RUN_LOG), (manifest, manifest), (hosts, hosts), (CONFIG_YAML, CONFIG_YAML), (RUN_YAML, RUN_YAML)]
        return [(RUN_LOG, f"{LOGS_DIR}/{self.writer}.log"), (manifest, f"{ARTIFACTS_DIR}/{manifest_name(self.writer)}"),
                (hosts, hosts)]

    def _fetch_hosts(self, state: _RunState) -> None:
        """Download the other writers' hosts/<writer>.yaml that changed, into the staged run."""
        import pyarrow.fs as pafs

        self.requests["list"] += 1
        infos = self._fs.get_file_info(pafs.FileSelector(f"{state.remote}/{HOSTS_DIR}", allow_not_found=True))
        for info in infos:
            if info.type != pafs.FileType.File or info.base_name == f"{self.writer}.yaml" or not info.base_name.endswith(".yaml"):
                continue
            stamp = (info.size, info.mtime.timestamp() if info.mtime else 0.0)
            if state.fetched.get(info.base_name) == stamp:
                continue
            self.requests["get"] += 1
            with self._fs.open_input_stream(info.path) as src:
                data = src.read()
            self.requests["bytes_down"] += len(data)
            try:
                parsed = yaml.load(data, Loader=_LOADER)
            except yaml.YAMLError:
                continue
            if isinstance(parsed, dict):
                write_yaml_atomic(state.dir / HOSTS_DIR / info.base_name, parsed)
                state.fetched[info.base_name] = stamp

    # --- requests ---------------------------------------------------------------------
    def _list_remote(self, remote: str) -> dict[str, int]:
        import pyarrow.fs as pafs

        self.requests["list"] += 1
        infos = self._fs.get_file_info(pafs.FileSelector(remote, recursive=True, allow_not_found=True))
        return {info.path[len(remote) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}

    def _put_file(self, path: Path, target: str) -> None:
        with open(path, "rb") as src:
            with self._fs.open_output_stream(target) as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    self.requests["bytes_up"] += len(chunk)
        self.requests["put"] += 1

    def _put_bytes(self, data: bytes, target: str) -> None:
        with self._fs.open_output_stream(target) as dst:
            dst.write(data)
        self.requests["put"] += 1
        self.requests["bytes_up"] += len(data)

    def _delete(self, target: str) -> None:
        self.requests["delete"] += 1
        try:
            self._fs.delete_file(target)
        except FileNotFoundError:
            pass
