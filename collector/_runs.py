"""One run's directory as a collector keeps it: run.yaml, config.yaml, run.log, metrics.

Usually one collector writes a run. When several hosts' collectors share a run folder
(a shared filesystem), the first to create the folder's `owner` file owns run.yaml,
config.yaml and run.log; the others write their ranks and parameters to
hosts/<writer>.yaml and their log lines to logs/<writer>.log, and the owner folds those
into run.yaml and config.yaml every second. Metrics are per writer anyway (MetricsStore).
run.yaml and config.yaml are rewritten atomically; logs are appended.

What a run costs between its frames is kept small (a thousand runs share one collector,
docs/architecture.md "Scaling"): run.yaml is written by the group commit of the turn that
changed it (so a hello's or finish's ack goes out only once it is durable, with no fsync of
its own), and only when its text changed; run.log is opened only to append a turn's lines;
a new run's metrics store (its WAL file) is made with its first point.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from expman._errors import ProtocolError
from expman._wire.frames import Frame
from expman._wire.limits import check_name
from expman._storage.layout import (
    CONFIG_YAML,
    DELIVERY_DIR,
    FINAL_STATUSES,
    HOSTS_DIR,
    LOGS_DIR,
    OWNER_FILE,
    RUN_LOG,
    RUN_YAML,
    dump_yaml,
    read_yaml,
    run_dir_name,
    write_text_atomic,
    write_yaml_atomic,
)

from ._delivery import Windows
from ._background import Background
from ._metrics_store import MetricsStore

log = logging.getLogger("expman.collector")

RUN_YAML_MIN_INTERVAL_S = 5.0  # unforced changes (heartbeats, last_step); a status change goes with the next commit
# Worst first: the run's status is the worst of its ranks' final statuses; a rank that
# vanished is "lost", and makes the run "crashed".
_SEVERITY = (("lost", "crashed"), ("failed", "failed"), ("killed", "killed"), ("finished", "finished"))
RANK_FINAL = frozenset(rank for rank, _ in _SEVERITY)
RANK_FINISHED = RANK_FINAL - {"lost"}  # said by the rank's own finish frame: only a new incarnation reopens it


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def find_run_dir(root: Path, uid: str) -> Path | None:
    for run_yaml in root.glob(f"*/*-{glob.escape(uid)}/{RUN_YAML}"):  # an id of "*" matches only itself
        if read_yaml(run_yaml).get("id") == uid:
            return run_yaml.parent
    return None


def add_child_on_disk(root: Path, parent_uid: str, child_uid: str) -> None:
    """Name a child in the run.yaml of a parent this collector does not hold open."""
    run_dir = find_run_dir(root, parent_uid)
    if run_dir is None:
        log.warning("run %s names parent %s, which is not under %s", child_uid, parent_uid, root)
        return
    info = read_yaml(run_dir / RUN_YAML)
    if child_uid not in info.setdefault("children", []):
        info["children"].append(child_uid)
        write_yaml_atomic(run_dir / RUN_YAML, info)


def claim_ownership(run_dir: Path, writer: str) -> bool:
    """Atomically create the owner file (O_EXCL works on NFS too); True if we own the run."""
    path = run_dir / OWNER_FILE
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return path.read_text().strip() == writer
    with os.fdopen(fd, "w") as fh:
        fh.write(writer + "\n")
    return True


def _parse_delivery(record: dict[str, Any], run_dir: Path) -> tuple[Windows, dict[int, list[Any]], dict[int, list[Any]]]:
    """The delivery record's parts, typed; a damaged record counts as none (with a warning)."""
    try:
        windows = {str(sender): (int(floor), [[int(lo), int(hi)] for lo, hi in ranges])
                   for sender, (floor, ranges) in record.get("windows", {}).items()}
        incarnations = {int(r): [str(v[0]), v[1]] for r, v in record.get("incarnations", {}).items()}
        finished = {int(r): [str(v[0]), v[1]] for r, v in record.get("finished", {}).items()}
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        log.warning("%s: ignoring a damaged delivery record (%s)", run_dir / DELIVERY_DIR, exc)
        return {}, {}, {}
    return windows, incarnations, finished


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file or folder in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Run:
    """A run the collector is writing (or has written, and may reopen for late frames).

    `new_dirs`: folders the hello created (the run's, maybe its experiment's), whose
    entries the first commit makes durable; a new run also starts with no metrics store."""

    def __init__(self, run_dir: Path, info: dict[str, Any], writer: str, background: Background | None = None,
                 new_dirs: list[Path] | None = None) -> None:
        self.dir = run_dir
        self.background = background  # where its parts are written and merged (None: at once)
        self.info = info
        self.writer = writer
        self.owner = claim_ownership(run_dir, writer)
        self.rank_params: dict[int, dict[str, Any]] = {}
        restored = read_yaml(run_dir / CONFIG_YAML) if self.owner else {}
        if restored:
            self.rank_params[-1] = restored  # kept from before a restart: yields to any rank
        self.params: dict[str, Any] = dict(restored)
        self._remote_params: dict[int, dict[str, Any]] = {}
        self.merged_at = 0.0
        self._reported_conflicts: set[str] = set(info.get("param_conflicts") or ())
        self.local_ranks: set[int] = set()
        log_path = run_dir / RUN_LOG if self.owner else run_dir / LOGS_DIR / f"{writer}.log"
        if not self.owner:
            log_path.parent.mkdir(exist_ok=True)
        self._delivery_path = run_dir / DELIVERY_DIR / f"{writer}.json"
        self.delivered: Windows
        self.incarnations: dict[int, list[Any]]  # rank -> [sender, started_at] of its latest hello
        self.finished_by: dict[int, list[Any]]  # rank -> [sender, started_at] of the incarnation that finished it
        self.delivered, self.incarnations, self.finished_by = _parse_delivery(self._load_delivery(log_path), run_dir)
        self.senders: set[str] = set(self.delivered)
        self.delivery_dirty = False
        # run.log: lines wait here for the commit (then appended, the file closed again)
        self._log_path = log_path
        self._log_lines: list[str] = []
        with open(log_path, "ab") as fh:  # there from the start, as docs/storage.md shows a run
            self._log_bytes = fh.tell()
        self._new_dirs = new_dirs or []
        # A run folder made just now holds no WAL to recover: its store waits for a first point.
        self.store: MetricsStore | None = None if new_dirs else MetricsStore(run_dir, writer, background)
        self._info_dirty = True
        self._info_due = True  # write run.yaml with the next commit (made so by a status change)
        self._info_text: dict[Path, str] = {}  # what each of our yaml files says on disk
        self._info_written_at = 0.0
        self.final_since: float | None = None  # when this collector's share of the run ended
        self.flushed_at = 0.0
        # Monotonic time of each rank's last frame; ranks that a previous collector left
        # running count from now, so they are marked lost if they never come back.
        self.rank_seen: dict[int, float] = {r: time.monotonic() for r in self.running_ranks()}
        self.heartbeat_interval: dict[int, float] = {}  # seconds, as each rank said in its hello
        self.finished_at_seq: dict[str, int] = {}  # sender -> seq of its finish frame
        # Runs in a bucket (collector/_bucket.py): the staged copy is ours alone, but its hosts
        # file goes up too, so the run's owner in the bucket can fold our ranks in.
        self.shares_hosts = False

    @classmethod
    def from_hello(cls, root: Path, frame: Frame, writer: str, background: Background | None = None) -> Run:
        body = frame.body
        try:
            experiment = check_name("experiment", body.get("experiment"))
            name = check_name("run", body.get("name"))
            dir_name = check_name("run folder", body.get("dir") or run_dir_name(name, frame.run))
            check_name("run id", frame.run)
        except ValueError as exc:
            raise ProtocolError("bad-values", str(exc)) from None
        existing = find_run_dir(root, frame.run) if body.get("reopen") else None
        run_dir = existing or root / experiment / dir_name
        new_dirs = [d for d in (run_dir.parent, run_dir) if not d.exists()]
        info = read_yaml(run_dir / RUN_YAML) if not new_dirs else {}
        if info and info.get("id") != frame.run:
            raise ProtocolError("bad-values", f"{run_dir} belongs to run {info.get('id')!r}")
        if not info:
            started = body.get("started_at") or frame.sent_at
            info = {
                "id": frame.run,
                "name": name,
                "experiment": experiment,
                "status": "running",
                "started_at": iso(started),
                "ended_at": None,
                "duration_s": None,
                "tags": list(body.get("tags") or []),
                "parent": body.get("parent"),
                "children": [],
                "world_size": int(body.get("world_size") or 1),
                "hosts": [],
                "ranks": {},
                "launcher": body.get("launcher") or "none",
                "job": body.get("job"),
                "software": body.get("software") or {},
            }
        run_dir.mkdir(parents=True, exist_ok=True)
        if new_dirs:  # the folders' entries become durable with the first commit (the hello's)
            new_dirs.insert(0, new_dirs[0].parent)
        return cls(run_dir, info, writer, background, new_dirs)

    # --- frames ----------------------------------------------------------------------
    def hello(self, frame: Frame) -> None:
        """A rank says who it is. Only a hello with a seq from a new incarnation reopens a
        rank that finished: a re-introduction (after a collector restart) from the process
        that sent the finish, and an introduction without a seq (a spool replay), do not."""
        body = frame.body
        known = self.info["ranks"].get(frame.rank)
        if known is not None and (frame.seq is None or self._reintroduced(frame, known)):
            if frame.host not in self.info["hosts"]:
                self.info["hosts"].append(frame.host)
            return
        if frame.seq is not None and frame.seq < self.finished_at_seq.get(frame.sender, -1):
            return  # a resent hello from before this sender's finish: nothing to reopen
        if frame.seq is not None:
            self.incarnations[frame.rank] = [frame.sender, body.get("started_at")]
            self.delivery_dirty = True
        started = iso(body.get("started_at") or frame.sent_at)
        if started and started < (self.info.get("started_at") or started):
            self.info["started_at"] = started  # the run starts with its earliest rank
        if frame.seq is not None and (body.get("reopen") or self.info.get("status") in FINAL_STATUSES):
            if self.info.get("status") in FINAL_STATUSES:
                self.info.setdefault("reopened_at", []).append(iso(frame.sent_at))
            self.info["status"] = "running"
            self.info["ended_at"] = None
            self.final_since = None
        self.info["world_size"] = max(int(self.info.get("world_size") or 1), int(body.get("world_size") or 1))
        if frame.host not in self.info["hosts"]:
            self.info["hosts"].append(frame.host)
        rank = self.info["ranks"].setdefault(frame.rank, {})
        self.local_ranks.add(frame.rank)
        self.heartbeat_interval[frame.rank] = float(body.get("heartbeat_interval") or 5.0)
        rank.update(
            host=frame.host,
            pid=body.get("pid"),
            local_rank=body.get("local_rank", 0),
            node_rank=body.get("node_rank", 0),
            status="running",
            started_at=rank.get("started_at") or iso(body.get("started_at") or frame.sent_at),
            ended_at=None,
            last_heartbeat=iso(frame.sent_at),
        )
        rank.setdefault("last_step", None)
        self.touch(force=True)

    def _reintroduced(self, frame: Frame, rank: dict[str, Any]) -> bool:
        """True for a hello from the incarnation (sender and start time) that finished this rank."""
        if rank.get("status") not in RANK_FINISHED:
            return False
        by = self.finished_by.get(frame.rank)
        return by is not None and by[0] == frame.sender and by[1] in (None, frame.body.get("started_at"))

    def heartbeat(self, frame: Frame) -> None:
        rank = self.info["ranks"].get(frame.rank)
        if rank is None:
            return
        rank["last_heartbeat"] = iso(frame.sent_at)
        self.touch()

    def stored_step(self, rank_id: int, step: int) -> None:
        """The collector stored points of this rank up to `step`: run.yaml's last_step is
        the highest stored step, so it holds where a killed rank stopped."""
        rank = self.info["ranks"].get(rank_id)
        if rank is not None and (rank.get("last_step") is None or step > rank["last_step"]):
            rank["last_step"] = step
            self.touch()

    def set_params(self, rank: int, params: dict[str, Any]) -> None:
        """Merge one rank's parameters (a rank's later values win)."""
        self.rank_params.setdefault(rank, {}).update(params)
        self._merge_params()

    def _merge_params(self, remote: dict[int, dict[str, Any]] | None = None) -> None:
        """config.yaml takes each key from the lowest rank that set it; where ranks
        disagree every rank's value is kept in run.yaml (param_conflicts) and reported."""
        by_rank = {**(remote or self._remote_params), **self.rank_params}
        merged: dict[str, Any] = {}
        values: dict[str, dict[int, Any]] = {}
        for rank in sorted(by_rank):
            for key, value in by_rank[rank].items():
                merged.setdefault(key, value)
                if rank >= 0:
                    values.setdefault(key, {})[rank] = value
        conflicts = {key: seen for key, seen in values.items() if any(v != merged[key] for v in seen.values())}
        # In a bucket every writer folds the run; rank 0's collector, the owner there, reports.
        report = not self.shares_hosts or 0 in self.local_ranks
        for key in sorted(set(conflicts) - self._reported_conflicts) if report else ():
            self._reported_conflicts.add(key)
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in sorted(conflicts[key].items()))
            self._write_log_line(f"{iso(time.time())} [collector] WARNING parameter {key!r} differs across ranks "
                                 f"({shown}); config.yaml keeps the lowest rank's, run.yaml keeps all")
        if conflicts != (self.info.get("param_conflicts") or {}):
            if conflicts:
                self.info["param_conflicts"] = conflicts
            else:
                self.info.pop("param_conflicts", None)
            self.touch()
        if merged != self.params or not (self.dir / CONFIG_YAML).exists():
            self.params = merged
            if self.owner:
                write_yaml_atomic(self.dir / CONFIG_YAML, merged)
            else:
                self.touch()

    def log_lines(self, frame: Frame) -> None:
        for entry in frame.body.get("lines") or ():
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ProtocolError("bad-shape", "log lines are [time, level, text]")
            when, level, text = entry
            prefix = f"{iso(float(when))} [{frame.host}:{frame.rank}] {str(level).upper()}"
            self._write_log_line(f"{prefix} {str(text).replace(chr(10), chr(10) + '    ')}")

    def _write_log_line(self, line: str) -> None:
        self._log_lines.append(line + "\n")

    def finish_rank(self, frame: Frame) -> bool:
        """Record one rank's end; return True when the whole run has ended."""
        body = frame.body
        status = body.get("status")
        if status not in FINAL_STATUSES or status == "crashed":
            raise ProtocolError("bad-values", f"unknown final status {status!r}")
        if isinstance(body.get("last_step"), int) and self.info["ranks"].get(frame.rank, {}).get("last_step") is None:
            self.info["ranks"].setdefault(frame.rank, {})["last_step"] = body["last_step"]
        if frame.seq is not None:
            self.finished_at_seq[frame.sender] = frame.seq
            hello = self.incarnations.get(frame.rank)
            self.finished_by[frame.rank] = [frame.sender, hello[1] if hello and hello[0] == frame.sender else None]
            self.delivery_dirty = True
        dropped = body.get("dropped_points")
        if type(dropped) is int and dropped > 0:  # memory and spool were both full: say so in run.yaml
            self.info["ranks"].setdefault(frame.rank, {})["dropped_points"] = dropped
            self.info["dropped_points"] = sum(int(r.get("dropped_points") or 0) for r in self.info["ranks"].values())
            self._write_log_line(f"{iso(time.time())} [collector] ERROR rank {frame.rank} dropped {dropped} points "
                                 "(its memory buffer and spool were both full)")
        self.end_rank(frame.rank, status, body.get("ended_at") or frame.sent_at, body.get("error"))
        return self.final_since is not None

    def end_rank(self, rank_id: int, status: str, ended_at: float, error: Any = None) -> None:
        rank = self.info["ranks"].setdefault(rank_id, {})
        rank.update(status=status, ended_at=iso(ended_at))
        if error:
            rank["error"] = error
            if status != "finished":
                self.info["error"] = error
        self._update_status()
        self.touch(force=True)

    def _update_status(self) -> None:
        """The run has ended once all world_size ranks have; its status is the worst."""
        ranks = self.info["ranks"]
        local_done = all(ranks.get(r, {}).get("status") in RANK_FINAL for r in self.local_ranks)
        run_done = len(ranks) >= self.info["world_size"] and all(r.get("status") in RANK_FINAL for r in ranks.values())
        if run_done and self.owner:
            statuses = {r["status"] for r in ranks.values()}
            self.info["status"] = next(run for rank, run in _SEVERITY if rank in statuses)
            self.info["ended_at"] = max(r["ended_at"] for r in ranks.values() if r.get("ended_at"))  # ISO sorts
            started = dt.datetime.fromisoformat(self.info["started_at"])
            ended = dt.datetime.fromisoformat(self.info["ended_at"])
            self.info["duration_s"] = round((ended - started).total_seconds(), 3)
            if self.info["status"] == "finished":
                self.info.pop("error", None)
        done = run_done if self.owner else (local_done and bool(self.local_ranks))
        if done and self.final_since is None:
            self.final_since = time.monotonic()

    def merge_remote(self) -> None:
        """Owner only: fold in the ranks and parameters that other hosts' collectors hold."""
        remote_params: dict[int, dict[str, Any]] = {}
        changed = False
        for path in sorted((self.dir / HOSTS_DIR).glob("*.yaml")):
            if path.stem == self.writer:
                continue
            try:
                part = read_yaml(path)
            except Exception:  # half-visible on a slow shared filesystem: next time
                continue
            for rank, state in (part.get("ranks") or {}).items():
                if rank not in self.local_ranks and self.info["ranks"].get(rank) != state:
                    self.info["ranks"][rank] = state
                    changed = True
            for host in part.get("hosts") or ():
                if host not in self.info["hosts"]:
                    self.info["hosts"].append(host)
                    changed = True
            self.info["world_size"] = max(self.info["world_size"], int(part.get("world_size") or 1))
            if part.get("code") and self.info.get("code") != part["code"]:
                self.info["code"] = part["code"]
                changed = True
            remote_params.update(part.get("params_by_rank") or {})
        self._remote_params = remote_params
        self._merge_params(remote_params)
        if changed:
            self._update_status()
            self.touch()

    def add_child(self, uid: str) -> None:
        if uid not in self.info["children"]:
            self.info["children"].append(uid)
            self.touch(force=True)

    # --- persistence ----------------------------------------------------------------------
    def metrics_store(self) -> MetricsStore:
        if self.store is None:  # late frames after the run ended reopen the store
            self.store = MetricsStore(self.dir, self.writer, self.background)
        return self.store

    def running_ranks(self) -> list[int]:
        return [r for r, v in self.info["ranks"].items() if v.get("status") == "running"]

    def touch(self, force: bool = False) -> None:
        """run.yaml changed; `force`: a change that goes out with the next commit (status,
        a rank's hello or end), others at most every RUN_YAML_MIN_INTERVAL_S."""
        self._info_dirty = True
        if force:
            self._info_due = True

    def info_due(self, now: float) -> bool:
        """Whether run.yaml is to be written at the next commit; the periodic work asks."""
        if self._info_dirty and not self._info_due and now - self._info_written_at >= RUN_YAML_MIN_INTERVAL_S:
            self._info_due = True
        return self._info_due

    def write_info(self, fsync: bool = True) -> None:
        """Write run.yaml (and our hosts file) where their text changed; `fsync=False` for a
        group commit that follows. A run folder made by the hello becomes durable too."""
        if self.owner:
            self._write_if_changed(self.dir / RUN_YAML, self.info, fsync)
        if not self.owner or self.shares_hosts:
            local = {r: self.info["ranks"][r] for r in sorted(self.local_ranks) if r in self.info["ranks"]}
            self._write_if_changed(self.dir / HOSTS_DIR / f"{self.writer}.yaml", {
                "writer": self.writer,
                "world_size": self.info["world_size"],
                "hosts": sorted({v.get("host") for v in local.values() if v.get("host")}),
                "ranks": local,
                "params_by_rank": {r: p for r, p in self.rank_params.items() if r >= 0},
                "code": self.info.get("code"),  # rank 0's code capture, when rank 0 is ours
            }, fsync)
        if fsync:
            for folder in self._new_dirs:
                fsync_dir(folder)
        self._new_dirs = []
        self._info_dirty = self._info_due = False
        self._info_written_at = time.monotonic()

    def _write_if_changed(self, path: Path, data: dict[str, Any], fsync: bool) -> None:
        text = dump_yaml(data)
        if self._info_text.get(path) == text:
            return
        write_text_atomic(path, text, fsync)
        if fsync:
            fsync_dir(path.parent)  # the rename
        self._info_text[path] = text

    def _load_delivery(self, log_path: Path) -> dict[str, Any]:
        """What a previous collector recorded; cut run.log back to what it had acknowledged
        (lines past that were never acknowledged: their frames come again)."""
        try:
            record = json.loads(self._delivery_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict):
            return {}
        size = record.get("log_bytes")
        if isinstance(size, int) and log_path.exists() and log_path.stat().st_size > size:
            log.warning("%s: removing %d bytes that no acknowledged frame wrote (they are resent)",
                        log_path, log_path.stat().st_size - size)
            os.truncate(log_path, size)
        return record

    def save_delivery(self, windows: Windows) -> None:
        """Record, before the acks go out, which frames are applied (per sender: a floor and
        ranges), which incarnation said hello and finished each rank, and how long run.log
        is: a restarted collector applies params, log lines and finish exactly once."""
        self._append_log()
        record = {
            "windows": {s: [floor, ranges] for s, (floor, ranges) in windows.items()},
            "incarnations": {str(r): v for r, v in self.incarnations.items()},
            "finished": {str(r): v for r, v in self.finished_by.items()},
            "log_bytes": self._log_bytes,
        }
        # a kill leaves the old record or the new one; the turn's commit makes it durable
        write_text_atomic(self._delivery_path, json.dumps(record, separators=(",", ":")), fsync=False)
        self.delivered = windows
        self.delivery_dirty = False

    def sync(self, fsync: bool = True) -> None:
        """Make everything appended since the last sync durable before acks go out;
        `fsync=False` only writes it, for the collector's group commit (then `committed`)."""
        if self.store is not None:
            self.store.sync(fsync)
        if self._log_lines:
            self._append_log()
            self.delivery_dirty = True
        if self._info_due:
            try:
                self.write_info(fsync)
            except OSError:
                if not fsync and self.store is not None:
                    self.store.commit_failed()  # not committed with the others: its frames are not acknowledged
                raise

    def _append_log(self) -> None:
        """The waiting log lines onto run.log (not fsynced: the delivery record says how much
        of it was acknowledged, and a restart cuts the rest)."""
        if not self._log_lines:
            return
        data = "".join(self._log_lines).encode("utf-8")
        with open(self._log_path, "ab") as fh:
            fh.write(data)
            self._log_bytes = fh.tell()
        self._log_lines.clear()

    def committed(self, ok: bool) -> None:
        """The group commit after `sync(fsync=False)` succeeded (or failed)."""
        if self.store is not None:
            self.store.committed() if ok else self.store.commit_failed()

    def flush_metrics(self, final: bool = False, written: threading.Event | None = None) -> None:
        """Hand pending rows to the background as a part (`written` is set once they are in
        one); `final` also merges all parts into one, and once that is done (a later call
        sees it) closes the WAL. Never waits."""
        if self.store is None:
            if written is not None:
                written.set()
            return
        if not final:
            self.store.flush(written, last=self.final_since is not None)
            return
        if not self.store.compacted:
            self.store.compact()
        if not self.store.busy:  # every part written and merged: only now does the WAL go
            self.store.close()
            self.store = None

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the background has written and merged this run's parts; False on timeout."""
        return self.store is None or self.store.wait(timeout)

    def close(self) -> None:
        self.sync()
        self.flush_metrics(final=self.final_since is not None)
        if self.store is not None:
            self.store.wait()
            self.store.close()
            self.store = None
        self.write_info()
