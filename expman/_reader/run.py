"""Reading runs back: `open_run`, `list_runs`, and `Run`, which returns Arrow tables.

Reads only the run directory (no collector needed). For a live or crashed run it also
replays the write-ahead segments not yet in Parquet, so nothing persisted is hidden.
Runs and roots may be local paths or URIs of any filesystem pyarrow opens (s3://,
gs://, hdfs://, file://), or paths inside a `filesystem=`: every file is reached through
expman/_storage/files.py. pyarrow is imported on first use, keeping `import expman` light.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from expman._errors import ExpmanError, RunNotFoundError
from expman._env import chosen_root
from expman._reader.progress import StepSpan, rank_progress
from expman._storage.files import resolve_root
from expman._storage.layout import (
    CONFIG_YAML, KEY, LOGS_DIR, RANK, RUN_LOG, RUN_YAML, STEP, TIME, ArtifactRecord,
    format_time, list_parts, read_yaml, read_yaml_if_present,
)
from expman._storage.files import LOCAL, Files, is_uri, locate, shown

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

log = logging.getLogger("expman")


class Run:
    """A run directory, on disk or on object storage. `info` and `params` are re-read on
    each access (runs may be live).

    `path` is a `Path` for a local run; for a run read through a pyarrow filesystem it is
    the path inside that filesystem (`bucket/prefix/mnist/run-1a2b` for S3), and
    `location` is the URI to show.
    """

    def __init__(self, path: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None) -> None:
        files, where = locate(path, filesystem)
        self._at(files, where)
        if not files.is_file(self.path / RUN_YAML):
            raise RunNotFoundError(f"{self.location} is not a run directory (no {RUN_YAML})")

    def _at(self, files: Files, path: PurePath) -> Run:
        self._files = files
        self.path = path.resolve() if isinstance(path, Path) else path
        return self

    @classmethod
    def _found(cls, files: Files, path: PurePath) -> Run:
        """A run whose run.yaml the caller has just seen: no second look."""
        return cls.__new__(cls)._at(files, path)

    @property
    def location(self) -> str:
        """Where the run is: its folder, or its URI (credentials and query left out)."""
        return self._files.uri(self.path)

    @property
    def info(self) -> dict[str, Any]:
        return read_yaml(self.path / RUN_YAML, self._files)

    @property
    def id(self) -> str:
        return self.info.get("id", "")

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def params(self) -> dict[str, Any]:
        return read_yaml(self.path / CONFIG_YAML, self._files)

    def log_text(self) -> str:
        """run.log, merged in time order with the lines other hosts' collectors kept (logs/)."""
        others = sorted(n for n in _visible(self._files.names(self.path / LOGS_DIR)) if n.endswith(".log"))
        texts = []
        for path in [self.path / RUN_LOG, *(self.path / LOGS_DIR / n for n in others)]:
            try:
                texts.append(self._files.read_text(path))
            except FileNotFoundError:
                continue
        if len(texts) <= 1:
            return texts[0] if texts else ""
        entries = [_log_entries(text) for text in texts]
        return "".join(heapq.merge(*entries))  # each entry starts with its ISO time, so text order is time order

    def console(self) -> pa.Table:
        """What the ranks printed (stdout and stderr), one row per line: time, host, rank,
        stream, line; in time order across hosts."""
        from expman._reader.console import console_table

        return console_table(_log_entries(self.log_text()))

    def metrics(
        self,
        keys: str | Iterable[str] | None = None,
        ranks: int | Iterable[int] | None = None,
        reduce: str | None = None,
        *,
        steps: tuple[int | None, int | None] | range | None = None,
        columns: Iterable[str] | None = None,
    ) -> pa.Table:
        """One row per point (columns key, value, text, step, rank, host, time); each key's
        points in arrival order (keys in name order within each part, then the points not yet
        in a part).

        Only what is asked for is read: `keys`, `ranks`, `steps` ((first, last), both included,
        None for open; or a range) and `columns` (a subset of the above). `reduce` ("mean",
        "min", "max", "median") instead returns one row per key and step across ranks: key,
        step, value, ranks (how many ranks had a value at that step), time (the latest).
        Median is t-digest based: exact for up to about a hundred ranks. For runs larger than
        memory, `iter_metrics` streams the same rows batch by batch.
        """
        from expman._reader.reduce import REDUCTIONS, reduce_across_ranks
        from expman._reader.scan import Scan, make_query

        if reduce is None:
            return Scan(self._snapshot(), make_query(keys, ranks, steps, columns)).table()
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {reduce!r}")
        if columns is not None:
            raise ValueError("columns= does not apply with reduce= (the result's columns are fixed)")
        return reduce_across_ranks(self._snapshot(), make_query(keys, ranks, steps), reduce)

    def iter_metrics(
        self,
        keys: str | Iterable[str] | None = None,
        ranks: int | Iterable[int] | None = None,
        *,
        steps: tuple[int | None, int | None] | range | None = None,
        columns: Iterable[str] | None = None,
    ) -> pa.RecordBatchReader:
        """The rows `metrics()` returns, as a stream of record batches (at most a row group,
        128k rows, each): memory stays at a batch whatever the size of the run. Iterate it,
        call `.read_all()`, or hand it to DuckDB or Polars, which scan it lazily. The run is
        read as it stood when this was called (its parts are held open)."""
        import pyarrow as pa

        from expman._reader.scan import Scan, make_query

        scan = Scan(self._snapshot(), make_query(keys, ranks, steps, columns))
        return pa.RecordBatchReader.from_batches(scan.schema, scan.batches())

    def rank_stats(self) -> pa.Table:
        """One row per rank: rank, host, status, last_step, steps_per_s, lag_steps (behind
        the furthest rank), last_heartbeat, straggler. Definitions: expman/_reader/progress.py,
        shared with `expman show` and the TUI."""
        import time

        import pyarrow as pa
        import pyarrow.compute as pc

        points = self.metrics(columns=(STEP, RANK, TIME))
        stepped = points.filter(pc.is_valid(points[STEP]))
        spans = {}
        for row in stepped.group_by(RANK).aggregate([(STEP, "min"), (STEP, "max"), (TIME, "min"), (TIME, "max")]).to_pylist():
            spans[row[RANK]] = StepSpan(row[f"{STEP}_min"], row[f"{STEP}_max"],
                                        row[f"{TIME}_min"].timestamp(), row[f"{TIME}_max"].timestamp())
        rows = [{
            "rank": p.rank,
            "host": p.host,
            "status": p.status,
            "last_step": p.last_step,
            "steps_per_s": p.steps_per_s,
            "lag_steps": p.lag_steps,
            "last_heartbeat": format_time(p.last_heartbeat),
            "straggler": p.straggler,
        } for p in rank_progress(self.info, time.time(), spans)]
        schema = pa.schema([("rank", pa.int32()), ("host", pa.string()), ("status", pa.string()),
                            ("last_step", pa.int64()), ("steps_per_s", pa.float64()), ("lag_steps", pa.int64()),
                            ("last_heartbeat", pa.string()), ("straggler", pa.bool_())])
        return pa.Table.from_pylist(rows, schema=schema)

    def _snapshot(self) -> Any:
        """A consistent look at the metrics: parts (held open) and write-ahead rows past them."""
        from expman._reader.live import snapshot

        return snapshot(self.path, self._files)

    def hardware(self, keys: str | Iterable[str] | None = None) -> pa.Table:
        """Hardware samples (columns time, host, device, key, value, text, rank) of every host
        that sampled this run, writer by writer in time order; empty if none was recorded."""
        import pyarrow as pa

        from expman._storage.layout import HARDWARE_DIR, hardware_schema

        _, tables = _read_parts(self._files, self.path / HARDWARE_DIR, keys, hardware_schema())
        if not tables:
            return hardware_schema().empty_table()
        return pa.concat_tables(tables).unify_dictionaries().combine_chunks()

    # --- artifacts (expman/_reader/artifacts.py) ------------------------------------------------
    def artifacts(self) -> list[ArtifactRecord]:
        """The run's artifacts, by name: each has name, size, sha256, time, rank, encrypted
        (and host, compression, stored, object)."""
        from expman._reader import artifacts as _artifact_reader

        return [r for _, r in sorted(_artifact_reader.records(self.path, self._files).items())]

    def read_artifact(self, name: str, *, key_file: str | os.PathLike[str] | None = None) -> bytes:
        """The artifact's bytes, checked against its SHA-256 (and decrypted with the master
        key, default $EXPMAN_KEY_FILE or ~/.config/expman/master.key)."""
        from expman._reader import artifacts as _artifact_reader

        return _artifact_reader.read(self.path, name, key_file, self._files)

    def download_artifact(
        self, name: str, dest: str | os.PathLike[str], *, key_file: str | os.PathLike[str] | None = None
    ) -> Path:
        """Stream the artifact to `dest` (a local file, or a local folder to put it in); returns
        the path. Memory stays at about two chunks whatever the size; nothing lands at `dest`
        unless every check passed."""
        from expman._reader import artifacts as _artifact_reader

        return _artifact_reader.download(self.path, name, dest, key_file, self._files)

    # --- media (expman/_reader/media.py) --------------------------------------------------------
    def media(self, keys: str | Iterable[str] | None = None) -> pa.Table:
        """Images, audio and tables: one row each (key, step, rank, time, kind, format, file,
        sha256, width, height, caption, ...), sorted by key, step, rank."""
        from expman._reader import media as _media

        return _media.index(self.path, self._files, keys)

    def read_media(self, key: str, step: int | None = None, rank: int = 0, *, as_: str | None = None,
                   key_file: str | os.PathLike[str] | None = None) -> Any:
        """One item's stored bytes (PNG, WAV, Parquet, ...), checked against its SHA-256;
        step None is the latest. `as_="pil"` or `"numpy"` for an image, `"numpy"` for audio
        ((samples, sample_rate)), `"arrow"` for a table."""
        from expman._reader import media as _media

        row = _media.find(self.path, self._files, key, step, rank)
        return _media.convert(row, _media.read_bytes(self.path, self._files, row, key_file), as_)

    def histograms(self, keys: str | Iterable[str] | None = None) -> pa.Table:
        """Histograms: key, step, rank, time, edges, counts (and count, nonfinite, min, max, sum)."""
        from expman._reader import media as _media

        return _media.histograms(self.path, self._files, keys)

    def table(self, key: str, step: int | None = None, rank: int = 0, *,
              key_file: str | os.PathLike[str] | None = None) -> pa.Table:
        """A table logged with `log_table`, as Arrow (step None: the latest)."""
        return self.read_media(key, step, rank, as_="arrow", key_file=key_file)

    def plot(self, keys: str | Iterable[str] | None = None, ranks: Iterable[int] | None = None) -> Any:
        """A matplotlib Figure (needs matplotlib): one chart per key, one line per rank."""
        from expman._reader.notebook import plot

        return plot(self, keys, ranks)

    def _repr_html_(self) -> str:
        from expman._reader.notebook import run_html

        return run_html(self)

    def __repr__(self) -> str:
        info = self.info
        return f"<expman.Run {info.get('experiment')}/{info.get('name')} id={info.get('id')} status={info.get('status')}>"


def _read_parts(
    files: Files, folder: PurePath, keys: str | Iterable[str] | None, schema: pa.Schema
) -> tuple[list, list[pa.Table]]:
    """The live parts in `folder` and their rows (only `keys`, if given). A part merged away
    while we read is no loss: its rows are in a newer part, so list again."""
    wanted = [keys] if isinstance(keys, str) else (list(keys) if keys is not None else None)
    filters = [(KEY, "in", wanted)] if wanted is not None else None
    for _attempt in range(10):
        parts = list_parts(folder, files=files)
        try:
            return parts, [files.read_parquet(p.path, filters=filters, schema=schema) for p in parts]
        except FileNotFoundError:
            continue
    raise ExpmanError(f"{files.uri(folder)}: parts kept changing while being read; try again")


def _visible(names: Iterable[str]) -> list[str]:
    """Names a `*` glob would match: hidden entries (.wal, .incoming, temp files) left out."""
    return [n for n in names if not n.startswith(".")]


def _log_entries(text: str) -> list[str]:
    """Split a log into entries: a line plus its indented continuation lines."""
    entries: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("    ") and entries:
            entries[-1] += line
        else:
            entries.append(line)
    return entries


def open_run(
    run: Run | str | os.PathLike[str], root: str | os.PathLike[str] | None = None, *,
    filesystem: pafs.FileSystem | None = None,
) -> Run:
    """Open a run: a `Run` (what `list_runs` returns), its directory or URI
    (s3://bucket/prefix/mnist/run-1a2b), 'experiment/run-folder' under the root, its id, a
    unique prefix of its id, or its name. An id wins over a name; a name or prefix that more
    than one run has is an error that lists them. With `filesystem` (a `pyarrow.fs.FileSystem`,
    for your own credentials or endpoint), `run` and `root` are paths inside it."""
    if isinstance(run, Run):
        return Run._found(run._files, run.path)
    if not isinstance(run, (str, os.PathLike)):
        raise TypeError(f"open_run takes a Run, a run directory, an id or a name; got {type(run).__name__}")
    files, path = locate(run, filesystem)
    if _holds_run(files, path, guess=filesystem is not None and not is_uri(run)):
        return Run._found(files, path)
    if is_uri(run):
        raise RunNotFoundError(f"{shown(str(run))} is not a run directory (no {RUN_YAML})")
    files, base = _root(root, filesystem)
    if files.is_file(base / run / RUN_YAML):
        return Run._found(files, base / run)
    return _by_id_or_name(files, base, str(run))


def _by_id_or_name(files: Files, base: PurePath, text: str) -> Run:
    """The run whose id is `text`, else the one run whose id starts with it or whose name it is.
    Folders are <name>-<id>, so only folders whose name could match have their run.yaml read."""
    found: dict[PurePath, dict[str, Any]] = {}
    for run_dir in _run_dirs(files, base):
        folder = run_dir.name
        if f"-{text}" not in folder and not folder.startswith(f"{text}-"):
            continue
        try:
            info = read_yaml_if_present(run_dir / RUN_YAML, files)
        except ExpmanError:
            continue
        if info is None:
            continue
        uid = str(info.get("id", ""))
        if uid == text:
            return Run._found(files, run_dir)
        if uid.startswith(text) or str(info.get("name", "")) == text:
            found[run_dir] = info
    if len(found) == 1:
        return Run._found(files, next(iter(found)))
    if not found:
        raise RunNotFoundError(f"no run {text!r}: not a run directory, and no run with that id, id prefix or name "
                               f"under {files.uri(base)}")
    listed = sorted(found.items(), key=lambda item: str(item[1].get("started_at") or ""), reverse=True)
    names = [f"{d.parent.name}/{d.name} (id {i.get('id')}, {i.get('status', 'unknown')}, started {i.get('started_at')})"
             for d, i in listed[:10]]
    more = f"; and {len(listed) - 10} more" if len(listed) > 10 else ""
    raise RunNotFoundError(f"{text!r} matches {len(listed)} runs: " + "; ".join(names) + more
                           + ". Give more of the id, or the run's folder")


def list_runs(
    root: str | os.PathLike[str] | None = None,
    experiment: str | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
) -> list[Run]:
    """The runs under a root (a folder, a URI such as s3://bucket/prefix, or a path inside
    `filesystem`), optionally of one experiment, newest first. Only each run.yaml's start
    time is read here (one line, for a file the collector wrote); `info` reads the rest."""
    return [run for run, _text in runs_with_yaml(root, experiment, filesystem=filesystem)]


def runs_with_yaml(
    root: str | os.PathLike[str] | None = None,
    experiment: str | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
) -> list[tuple[Run, str]]:
    """`list_runs`, each run with the text of the run.yaml it was sorted by: a caller that
    shows a table of runs (`expman ls`) reads each file once (one GET per run on a bucket)."""
    files, base = _root(root, filesystem)
    run_dirs = list(_run_dirs(files, base, experiment=experiment))
    runs = []
    for run_dir, text in zip(run_dirs, _read_texts(files, [d / RUN_YAML for d in run_dirs])):
        if text is None:
            continue
        path = run_dir / RUN_YAML
        try:
            started = _started_at(files, path, text)
        except ExpmanError as exc:
            log.warning("expman: skipping a run: %s", exc)
            continue
        if started is not None:
            runs.append((started, Run._found(files, run_dir), text))
    runs.sort(key=lambda item: item[0], reverse=True)
    return [(run, text) for _, run, text in runs]


_PARALLEL_READS = 16  # on object storage each read is a round trip: this many in flight at once


def _read_texts(files: Files, paths: list[PurePath]) -> list[str | None]:
    """Each file's text, None where it is missing; on object storage several requests at
    once (10,000 run.yaml files one after another would take minutes)."""
    def read(path: PurePath) -> str | None:
        try:
            return files.read_text(path)
        except FileNotFoundError:
            return None

    if files is LOCAL or len(paths) < 2:
        return [read(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(_PARALLEL_READS, len(paths)), thread_name_prefix="expman-read") as pool:
        return list(pool.map(read, paths))


# The collector writes run.yaml with yaml.safe_dump: a top-level key starts a line, and a
# string that looks like a time is quoted. Anything else is parsed (and checked) in full.
_STARTED_AT = re.compile(r"^started_at: *(?:'([^'\n]*)'|\"([^\"\n]*)\"|(null|~)?) *$", re.M)


def _started_at(files: Files, path: PurePath, text: str) -> str | None:
    """The run's start time as text, for sorting ("" if it has none), from run.yaml's `text`;
    None when the file went away meanwhile."""
    match = _STARTED_AT.search(text) if text.startswith(("id:", "name:", "experiment:")) else None
    if match is not None:
        return match[1] or match[2] or ""
    info = read_yaml_if_present(path, files) if text.strip() else {}  # not the collector's layout: parse it
    return None if info is None else str(info.get("started_at") or "")


def run_folders(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Candidate run folders under a local root, <root>/<experiment>/<run>, without reading
    any file (a caller that caches run.yaml by its mtime reads only the ones that changed)."""
    base = resolve_root(root)
    return [Path(p) for p in _run_dirs(LOCAL, base)]


def _holds_run(files: Files, path: PurePath, guess: bool) -> bool:
    """Whether `path` is a run folder. A guess (an id or relative name tried as a full path
    in a filesystem: its first part is then a bucket, maybe someone else's) that the store
    refuses is a no, not an error."""
    try:
        return files.is_file(path / RUN_YAML)
    except OSError:
        if guess:
            return False
        raise


def _root(root: str | os.PathLike[str] | None, filesystem: pafs.FileSystem | None) -> tuple[Files, PurePath]:
    """Where the runs are: the `root` argument, else $EXPMAN_ROOT, else ./experiments."""
    files, path = locate(chosen_root(root), filesystem)
    return files, resolve_root(path) if isinstance(path, Path) else path


def _run_dirs(files: Files, base: PurePath, experiment: str | None = None, suffix: str = "") -> Iterator[PurePath]:
    """Candidate run folders, <base>/<experiment>/<run>, as the glob `*/*{suffix}` finds them:
    one listing per experiment, so object stores answer a few requests, not one per file."""
    experiments = [experiment] if experiment else _visible(files.dirs(base))
    for name in experiments:
        for run_name in _visible(files.dirs(base / name)):
            if run_name.endswith(suffix):
                yield base / name / run_name
