"""What the Runs and Run screens show about a run, besides its series: summaries and rank rows.

Plain functions and small classes over the run folders and `expman.open_run`; they do
file I/O, so the screens call them from workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterable

import numpy as np

from expman._reader.params import flat_params
from expman._reader.progress import RankProgress, rank_progress
from expman._errors import ExpmanError
from expman._reader.live import open_part
from expman._storage.files import LOCAL, Files
from expman._storage.summary import read_summary
from expman._storage.layout import (CONFIG_YAML, FINAL_STATUSES, KEY, METRICS_DIR, RUN_YAML, VALUE, WAL_DIR, list_parts,
                                    parse_time, read_yaml)
from expman._storage.wal import list_segments

from . import run_filter
from .store import Store

# Columns of the Runs screen: the latest value of the first of these keys that runs have.
DEFAULT_KEY_METRICS = ("loss", "val_loss", "acc", "accuracy", "lr")
MAX_KEY_METRICS = 3


@dataclass(frozen=True)
class RunSummary:
    """One row of the Runs screen."""

    path: PurePath  # a Path on a local root; the path inside the filesystem on a bucket
    experiment: str
    name: str
    uid: str
    status: str
    started: float | None
    ended: float | None
    duration_s: float | None
    ranks: int
    world_size: int
    hosts: tuple[str, ...]
    tags: tuple[str, ...]
    latest: dict[str, float] = field(default_factory=dict, compare=False)
    params: dict[str, Any] = field(default_factory=dict, compare=False)  # flat, dotted keys

    @property
    def folder(self) -> str:
        return f"{self.experiment}/{self.path.name}"

    def duration(self, now: float) -> float | None:
        if self.duration_s is not None:
            return float(self.duration_s)
        if self.started is None:
            return None
        end = self.ended if self.ended is not None else now
        return max(0.0, end - self.started)

    def matches(self, text: str) -> bool:
        """Whether every word of `text` holds for this run (the language: data/run_filter.py)."""
        return run_filter.matches(self, text)

    def value(self, key: str) -> Any:
        """A parameter's value, else the latest value of a metric; None when the run has neither."""
        if key in self.params:
            return self.params[key]
        return self.latest.get(key)


def summarize(path: PurePath, info: dict[str, Any], latest: dict[str, float],
              params: dict[str, Any] | None = None) -> RunSummary:
    ranks = info.get("ranks") or {}
    return RunSummary(
        path=path,
        experiment=str(info.get("experiment") or path.parent.name),
        name=str(info.get("name") or path.name),
        uid=str(info.get("id") or ""),
        status=str(info.get("status") or "unknown"),
        started=parse_time(info.get("started_at")),
        ended=parse_time(info.get("ended_at")),
        duration_s=info.get("duration_s"),
        ranks=len(ranks),
        world_size=int(info.get("world_size") or len(ranks) or 1),
        hosts=tuple(str(h) for h in info.get("hosts") or ()),
        tags=tuple(str(t) for t in info.get("tags") or ()),
        latest=latest,
        params=params or {},
    )


class LatestValues:
    """The last value of a few keys per run: from a part's chart summary when it has one,
    else from its newest row groups.

    Finished parts never change, so a part's answer is kept; the write-ahead tail of a
    live run is left to the Run screen (the summary lags by at most one flush, ~0.5 s).
    """

    def __init__(self, keys: Iterable[str], files: Files = LOCAL) -> None:
        self.keys = tuple(keys)
        self.files = files
        self._by_part: dict[PurePath, dict[str, float]] = {}

    def of(self, run_dir: PurePath, every_key: bool = False) -> dict[str, float]:
        """The latest value of each of `keys`; with `every_key`, of every key a part's summary
        knows as well (what `loss<0.5` filters on)."""
        found: dict[str, float] = {}
        parts = list_parts(run_dir / METRICS_DIR, files=self.files)
        for part in reversed(parts):  # newest first
            if part.path not in self._by_part:
                try:
                    self._by_part[part.path] = self._read(part.path)
                except (FileNotFoundError, OSError):
                    continue
            for key, value in self._by_part[part.path].items():
                found.setdefault(key, value)
            if not every_key and all(k in found for k in self.keys):
                break
        return found if every_key else {k: v for k, v in found.items() if k in self.keys}

    def _read(self, path: PurePath) -> dict[str, float]:
        pf = open_part(self.files, path)
        summary = read_summary(pf)
        if summary is not None:  # every key: `loss<0.5` filters on any metric of a merged run
            return {k: s.last_value for k, s in summary.items() if s.last_value is not None}
        out: dict[str, float] = {}
        for i in reversed(range(pf.metadata.num_row_groups)):
            table = pf.read_row_group(i, columns=[KEY, VALUE]).combine_chunks()
            keys = table.column(KEY).chunk(0) if table.num_rows else None
            if keys is None:
                continue
            names = keys.dictionary.to_pylist()
            index = keys.indices.to_numpy(zero_copy_only=False)
            value_col = table.column(VALUE).chunk(0)
            numeric = value_col.is_valid().to_numpy(zero_copy_only=False)
            values = value_col.to_numpy(zero_copy_only=False)
            for key in self.keys:
                if key in out or key not in names:
                    continue
                rows = np.flatnonzero((index == names.index(key)) & numeric)
                if len(rows):
                    out[key] = float(values[rows[-1]])
            if len(out) == len(self.keys):
                break
        return out

    def forget(self, keep: set[PurePath]) -> None:
        for path in [p for p in self._by_part if p.parent.parent not in keep]:
            del self._by_part[path]


class RunIndex:
    """Every run under a root, newest first, with the latest values of the key metrics.

    An idle viewer must cost nothing, even over thousands of finished runs, so a scan
    touches only what can have changed:

    - folders are listed again only when their mtime moved (a new experiment or run
      changes its parent's mtime): a scan of a quiet root is one stat per experiment;
    - a running run (or one whose run.yaml could not be read) is polled every scan: run.yaml
      re-read when its mtime or size changed, its latest values from new parts;
    - a finished run is not polled: every SETTLED_SWEEP scans its folder's mtime is checked
      (the collector replaces run.yaml by a rename, which moves it), so a run reopened with
      `experiment_uid=` or rewritten by hand still shows up.

    On a bucket every look is a request and folders have no mtime: folders are listed
    again every BUCKET_LIST_EVERY scans (new runs show up within that), running runs are
    polled as above (a HEAD of run.yaml and config.yaml, a LIST of metrics/ each), and
    finished runs are never looked at again.

    `version` goes up whenever what `scan` returns changed, so the screen redraws nothing
    while nothing changes.
    """

    SETTLED_SWEEP = 20  # scans between checks of the finished runs (10 s at the default poll)
    BUCKET_LIST_EVERY = 5  # scans between listings of a bucket's folders (20 s at the bucket's default poll)

    def __init__(self, root: Store | str | os.PathLike[str], key_metrics: Iterable[str] = DEFAULT_KEY_METRICS) -> None:
        self.store = root if isinstance(root, Store) else Store.local(root)
        self.root = self.store.root
        self.latest = LatestValues(key_metrics, self.store.files)
        self.version = 0
        self._dirs: dict[PurePath, tuple[int | None, list[PurePath]]] = {}  # folder -> (mtime_ns, its subfolders)
        self._infos: dict[PurePath, tuple[tuple[int, int], dict[str, Any]]] = {}  # run -> (run.yaml mtime, size), info
        self._configs: dict[PurePath, tuple[tuple[int, int], dict[str, Any]]] = {}  # run -> config.yaml's, params
        self._settled: dict[PurePath, int | None] = {}  # finished run -> its folder's mtime_ns when last read
        self._summaries: dict[PurePath, RunSummary] = {}
        self._order: list[RunSummary] = []
        self._scans = 0
        self._listed = 0  # folder listings done: none since the last scan means no run came or went
        self._relist = True  # on a bucket: list folders again in this scan
        self.reads = 0  # run.yaml files read: tests check an idle scan reads none

    def _subdirs(self, folder: PurePath) -> list[PurePath]:
        """Visible subfolders of `folder`, listed again only when its mtime changed (on a
        bucket: when this scan lists again)."""
        try:
            mtime = self.store.folder_mtime(folder)
        except OSError:
            self._dirs.pop(folder, None)
            return []
        known = self._dirs.get(folder)
        if known is None or (known[0] != mtime if mtime is not None else self._relist):
            self._listed += 1
            known = (mtime, self.store.subdirs(folder))
            self._dirs[folder] = known
        return known[1]

    def run_folders(self) -> list[PurePath]:
        listed = self._listed
        experiments = self._subdirs(self.root)
        folders = [run for exp in experiments for run in self._subdirs(exp)]
        if self._listed != listed:  # something was listed again: forget folders that went away
            live = {self.root, *experiments}
            for gone in [d for d in self._dirs if d not in live]:
                del self._dirs[gone]
        return folders

    def scan(self) -> list[RunSummary]:
        """Every run, newest first (see the class docstring for what is read)."""
        self._scans += 1
        remote = self.store.remote
        self._relist = self._scans % self.BUCKET_LIST_EVERY == 1 or self.BUCKET_LIST_EVERY <= 1
        sweep = not remote and (self._scans % self.SETTLED_SWEEP == 1 or self.SETTLED_SWEEP <= 1)
        listed = self._listed
        folders = self.run_folders()
        if self._listed == listed and not sweep:  # the quiet case: poll the live runs only
            return self._poll_live()
        changed = set(folders) != set(self._summaries)
        summaries: dict[PurePath, RunSummary] = {}
        for path in folders:
            old = self._summaries.get(path)
            if old is not None and path in self._settled and not sweep:
                summaries[path] = old
                continue
            found = self._poll(path, old)
            if found is not None:
                summaries[path] = found
                changed |= found != old or old is None or found.latest != old.latest
        self._summaries = summaries
        for path in [p for p in self._infos if p not in summaries]:
            del self._infos[path]
            self._settled.pop(path, None)
            self._configs.pop(path, None)
        if changed or self._scans == 1:
            self.version += 1
            self._order = sorted(summaries.values(), key=lambda s: str(self._infos[s.path][1].get("started_at") or ""),
                                 reverse=True)
            self.latest.forget(set(summaries))
        return list(self._order)

    def _poll_live(self) -> list[RunSummary]:
        changed = False
        for path, old in list(self._summaries.items()):
            if path in self._settled:
                continue
            found = self._poll(path, old)
            if found is None:
                continue
            if found != old or found.latest != old.latest:
                self._summaries[path] = found
                changed = True
        if changed:
            self.version += 1
            self._order = [self._summaries[s.path] for s in self._order if s.path in self._summaries]
        return list(self._order)

    def _poll(self, path: PurePath, old: RunSummary | None) -> RunSummary | None:
        """Re-read one run: run.yaml if it changed, its latest values; None when it is not a run (yet)."""
        store = self.store
        if path in self._settled:
            try:
                folder_mtime = store.folder_mtime(path)
            except OSError:
                return None
            if folder_mtime == self._settled[path] and old is not None:
                return old
        try:
            signature = store.stat(path / RUN_YAML)
            folder_mtime = store.folder_mtime(path)
        except OSError:
            return None
        known = self._infos.get(path)
        if known is None or known[0] != signature:
            try:
                known = (signature, read_yaml(path / RUN_YAML, store.files))
                self.reads += 1
            except (ExpmanError, OSError):
                return old
        self._infos[path] = known
        summary = summarize(path, known[1], self.latest.of(path, every_key=True), self._params(path))
        if summary.status in FINAL_STATUSES and not has_live_tail(path, store.files):
            self._settled[path] = folder_mtime  # its parts are final: nothing to poll until the folder moves
        else:
            self._settled.pop(path, None)
        return summary

    def _params(self, path: PurePath) -> dict[str, Any]:
        """The run's parameters, flat; config.yaml re-read only when its mtime or size changed."""
        try:
            signature = self.store.stat(path / CONFIG_YAML)
        except OSError:
            return {}
        known = self._configs.get(path)
        if known is None or known[0] != signature:
            try:
                known = (signature, flat_params(read_yaml(path / CONFIG_YAML, self.store.files)))
            except (ExpmanError, OSError):
                known = (signature, {})
            self._configs[path] = known
        return known[1]

    def key_columns(self, summaries: list[RunSummary]) -> list[str]:
        """The key metrics that at least one run has, in preference order, at most MAX_KEY_METRICS."""
        present = {k for s in summaries for k in s.latest}
        return [k for k in self.latest.keys if k in present][:MAX_KEY_METRICS]


# --- ranks ---------------------------------------------------------------------------------
# The rank table's rows are RankProgress (expman/_reader/progress.py): the same steps/s, lag
# and straggler rule as run.rank_stats() and `expman show`.


def rank_rows(info: dict[str, Any], now: float) -> list[RankProgress]:
    """The rank table: state, step, steps/s, lag behind the furthest rank, heartbeat age, stragglers."""
    return rank_progress(info, now)


# --- params ----------------------------------------------------------------------------------


def params_diff(params: list[dict[str, Any]], only_different: bool = True) -> list[tuple[str, list[Any]]]:
    """Rows (key, value per run) over the union of keys; `only_different` keeps rows that differ."""
    flat = [flat_params(p) for p in params]
    keys = sorted({k for p in flat for k in p})
    missing = object()
    rows = []
    for key in keys:
        values = [p.get(key, missing) for p in flat]
        if only_different and all(v == values[0] for v in values):
            continue
        rows.append((key, [None if v is missing else v for v in values]))
    return rows


# --- run.log, artifacts, hardware ------------------------------------------------------------
class LogTail:
    """Follows run.log: the last lines at first, then only what was appended (on a bucket,
    where an object is replaced whole, a ranged read of what grew)."""

    def __init__(self, path: PurePath, initial_bytes: int = 64 * 1024, store: Store | None = None) -> None:
        self.path = path
        self.store = store or Store.local(path.parent)
        self.offset: int | None = None
        self.initial_bytes = initial_bytes
        self._partial = b""

    def read_new(self) -> list[str]:
        try:
            _mtime, size = self.store.stat(self.path)
        except FileNotFoundError:
            return []
        if self.offset is None:
            self.offset = max(0, size - self.initial_bytes)
            skip_first = self.offset > 0
        else:
            skip_first = False
            if size < self.offset:  # truncated or replaced: start over
                self.offset, self._partial = 0, b""
        if size == self.offset:
            return []
        data = self.store.read_range(self.path, self.offset, size - self.offset)
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if skip_first and lines:
            lines = lines[1:]
        return [line.decode("utf-8", "replace") for line in lines]


def artifacts(run: Any) -> list[tuple[str, int]]:
    """(name, size) of the run's artifacts, from `run.artifacts()` (the manifest). A manifest
    that cannot be read raises: the screen shows the error, not the store's content hashes."""
    return [(str(item.name), int(item.size) if item.size is not None else -1) for item in run.artifacts()]


def find_run(root: Store | Path, ref: str) -> PurePath:
    """The run folder `ref` names under `root`: `experiment/folder`, a folder, a run id, a unique
    id prefix or a unique run name (folders are `<name>-<id>`); ValueError says why not."""
    store = root if isinstance(root, Store) else Store.local(root)
    ref = ref.strip().strip("/")
    folders = [run for exp in store.subdirs(store.root) for run in store.subdirs(exp)
               if store.files.is_file(run / RUN_YAML)]
    for test in (lambda p: f"{p.parent.name}/{p.name}" == ref, lambda p: p.name == ref,
                 lambda p: p.name.rsplit("-", 1)[-1] == ref, lambda p: p.name.rsplit("-", 1)[0] == ref,
                 lambda p: p.name.rsplit("-", 1)[-1].startswith(ref)):
        found = [p for p in folders if test(p)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{ref!r} names {len(found)} runs ({', '.join(p.name for p in found[:3])}…): "
                             "give more of the id")
    raise ValueError(f"no run {ref!r} under {store.label}")


def read_yaml_safe(path: PurePath, files: Files = LOCAL) -> dict[str, Any]:
    try:
        return read_yaml(path, files)
    except ExpmanError:
        return {}


def has_live_tail(run_dir: PurePath, files: Files = LOCAL) -> bool:
    wal = run_dir / WAL_DIR
    return any(list_segments(wal / writer, files) for writer in files.dirs(wal) if not writer.startswith("."))
