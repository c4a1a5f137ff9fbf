"""Reading runs back: `open_run`, `list_runs`, and `Run`, which returns Arrow tables.

Reads only the run directory (no collector needed). For a live or crashed run it also
replays the write-ahead segments not yet in Parquet, so nothing persisted is hidden.
pyarrow is imported on first use, keeping `import expman` light.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ._errors import ExpmanError, RunNotFoundError
from ._identity import resolve_root
from ._schema import CONFIG_YAML, KEY, METRICS_DIR, RUN_LOG, RUN_YAML, WAL_DIR, ArtifactRecord, list_parts, read_yaml

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("expman")


class Run:
    """A run directory on disk. `info` and `params` are re-read on each access (runs may be live)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        if not (self.path / RUN_YAML).is_file():
            raise RunNotFoundError(f"{self.path} is not a run directory (no {RUN_YAML})")

    @property
    def info(self) -> dict[str, Any]:
        return read_yaml(self.path / RUN_YAML)

    @property
    def id(self) -> str:
        return self.info.get("id", "")

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def params(self) -> dict[str, Any]:
        return read_yaml(self.path / CONFIG_YAML)

    def log_text(self) -> str:
        try:
            return (self.path / RUN_LOG).read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def metrics(self, keys: str | Iterable[str] | None = None) -> pa.Table:
        """One row per point (columns key, value, text, step, rank, host, time), in arrival order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ._columns import wal_table
        from ._schema import metrics_schema
        from ._wal import list_segments, read_records

        wanted = [keys] if isinstance(keys, str) else (list(keys) if keys is not None else None)
        filters = [(KEY, "in", wanted)] if wanted is not None else None
        for _attempt in range(10):
            parts = list_parts(self.path / METRICS_DIR)
            try:
                tables = [pq.read_table(p.path, filters=filters, schema=metrics_schema()) for p in parts]
                break
            except FileNotFoundError:  # merged away meanwhile: its rows are in a newer part
                continue
        else:
            raise ExpmanError(f"{self.path}: metrics parts kept changing while being read; try again")
        covered = max((p.last for p in parts), default=-1)
        segments = [path for n, path in list_segments(self.path / WAL_DIR) if n > covered]
        tail = wal_table(rec for path in segments for rec in read_records(path))
        if tail is not None:
            if wanted is not None:
                import pyarrow.compute as pc

                tail = tail.filter(pc.is_in(tail[KEY].cast(pa.string()), pa.array(wanted, pa.string())))
            tables.append(tail)
        if not tables:
            return metrics_schema().empty_table()
        return pa.concat_tables(tables).unify_dictionaries().combine_chunks()

    # --- artifacts (expman/_artifact_reader.py) ------------------------------------------------
    def artifacts(self) -> list[ArtifactRecord]:
        """The run's artifacts, by name: each has name, size, sha256, time, rank, encrypted
        (and host, compression, stored, object)."""
        from . import _artifact_reader

        return [r for _, r in sorted(_artifact_reader.records(self.path).items())]

    def read_artifact(self, name: str, *, key_file: str | os.PathLike[str] | None = None) -> bytes:
        """The artifact's bytes, checked against its SHA-256 (and decrypted with the master
        key, default $EXPMAN_KEY_FILE or ~/.config/expman/master.key)."""
        from . import _artifact_reader

        return _artifact_reader.read(self.path, name, key_file)

    def download_artifact(
        self, name: str, dest: str | os.PathLike[str], *, key_file: str | os.PathLike[str] | None = None
    ) -> Path:
        """Stream the artifact to `dest` (a file, or a folder to put it in); returns the path.
        Memory stays at about two chunks whatever the size; nothing lands at `dest` unless
        every check passed."""
        from . import _artifact_reader

        return _artifact_reader.download(self.path, name, dest, key_file)

    def __repr__(self) -> str:
        info = self.info
        return f"<expman.Run {info.get('experiment')}/{info.get('name')} id={info.get('id')} status={info.get('status')}>"


def open_run(run: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Run:
    """Open a run by its directory, by 'experiment/run-folder' under the root, or by its id."""
    path = Path(run)
    if (path / RUN_YAML).is_file():
        return Run(path)
    base = resolve_root(root)
    if (base / path / RUN_YAML).is_file():
        return Run(base / path)
    uid = str(run)
    for run_yaml in base.glob(f"*/*-{uid}/{RUN_YAML}"):
        if read_yaml(run_yaml).get("id") == uid:
            return Run(run_yaml.parent)
    raise RunNotFoundError(f"no run {uid!r}: not a run directory, and no run with that id under {base}")


def list_runs(root: str | os.PathLike[str] | None = None, experiment: str | None = None) -> list[Run]:
    """The runs under a root (optionally one experiment), newest first."""
    base = resolve_root(root)
    pattern = f"{experiment}/*/{RUN_YAML}" if experiment else f"*/*/{RUN_YAML}"
    runs = []
    for run_yaml in base.glob(pattern):
        try:
            started = str(read_yaml(run_yaml).get("started_at") or "")
        except ExpmanError as exc:
            log.warning("expman: skipping a run: %s", exc)
            continue
        runs.append((started, Run(run_yaml.parent)))
    runs.sort(key=lambda item: item[0], reverse=True)
    return [run for _, run in runs]
