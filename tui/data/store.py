"""Where the TUI reads runs: a local folder, or a bucket (s3://, gs://, ...) through pyarrow.

The readers reach files through `expman._storage.files`; this adds what a viewer that
polls needs besides reading: a file's (mtime, size) to tell whether it changed, a
folder's subfolders, a byte range of a growing file, and how often a look is worth it.
A look costs a stat (about a microsecond) on a local disk, and a request (a HEAD or a
LIST: milliseconds, and billed) on a bucket, where folders have no mtime either. So on a
bucket the screens poll every BUCKET_POLL_S, the Runs screen lists folders again only
every few scans, and finished runs are not polled at all (tui/data/runs.py, RunIndex).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from expman._env import chosen_root
from expman._storage.files import LOCAL, ArrowFiles, Files, locate, shown

LOCAL_POLL_S = 0.25  # a live point is on screen within ~0.5 s; a poll of a live run costs ~20-40 ms
BUCKET_POLL_S = 2.0  # a poll of a live run is ~5 requests; collectors upload a part every ~10 s


@dataclass(frozen=True)
class Store:
    """The root the TUI shows and how to look at it. `root` is a `Path` on a local disk, the
    path inside the filesystem (bucket/prefix) on a bucket; `label` is what the user typed."""

    files: Files
    root: PurePath
    label: str

    @classmethod
    def open(cls, where: str | os.PathLike[str] | None) -> Store:
        """The store for a root: a folder (default $EXPMAN_ROOT, else ./experiments) or a URI.
        ExpmanError for a URI no pyarrow filesystem opens."""
        chosen = chosen_root(where)
        files, path = locate(chosen)
        if isinstance(path, Path):
            root = path.expanduser().resolve()
            return cls(LOCAL, root, os.fspath(where) if where is not None else str(root))  # a relative root stays so
        return cls(files, path, shown(str(chosen)))

    @classmethod
    def local(cls, root: str | os.PathLike[str]) -> Store:
        return cls(LOCAL, Path(root).expanduser().resolve(), os.fspath(root))

    @property
    def remote(self) -> bool:
        """True on a bucket (every look a request), False on a local or shared filesystem."""
        return isinstance(self.files, ArrowFiles)

    @property
    def poll_interval(self) -> float:
        return BUCKET_POLL_S if self.remote else LOCAL_POLL_S

    def exists(self) -> bool:
        """Whether the root is a folder (on a bucket: a prefix with objects under it)."""
        if not self.remote:
            return os.path.isdir(self.root)
        import pyarrow.fs as pafs

        return self._filesystem.get_file_info(str(self.root)).type == pafs.FileType.Directory

    def folder_mtime(self, folder: PurePath) -> int | None:
        """A local folder's mtime_ns (OSError when it is gone); None on a bucket, where
        folders have none: the caller lists them again on its own schedule."""
        return None if self.remote else os.stat(folder).st_mtime_ns

    def subdirs(self, folder: PurePath) -> list[PurePath]:
        """Visible subfolders, sorted; [] when the folder is missing."""
        if not self.remote:
            try:
                with os.scandir(folder) as entries:
                    return sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir())
            except OSError:
                return []
        return sorted(folder / name for name in self.files.dirs(folder) if not name.startswith("."))

    def stat(self, path: PurePath) -> tuple[int, int]:
        """A file's (mtime_ns, size): what tells a reader the file changed. FileNotFoundError
        when missing. On a bucket mtimes have a 1 s grain: a rewrite within the same second
        and of the same size shows at the next one."""
        if not self.remote:
            st = os.stat(path)
            return st.st_mtime_ns, st.st_size
        import pyarrow.fs as pafs

        info = self._filesystem.get_file_info(str(path))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.files.uri(path))
        return int(info.mtime_ns or 0), int(info.size or 0)

    def entries(self, folder: PurePath) -> list[tuple[str, int, int]]:
        """(name, size, mtime_ns) of the files in a folder; [] when it is missing."""
        if not self.remote:
            found = []
            try:
                with os.scandir(folder) as listing:
                    for entry in listing:
                        try:
                            st = entry.stat()
                        except OSError:  # gone meanwhile (rolled into a part)
                            continue
                        found.append((entry.name, st.st_size, st.st_mtime_ns))
            except OSError:
                return []
            return found
        import pyarrow.fs as pafs

        infos = self._filesystem.get_file_info(pafs.FileSelector(str(folder), allow_not_found=True))
        return [(i.base_name, int(i.size or 0), int(i.mtime_ns or 0)) for i in infos if i.type == pafs.FileType.File]

    def read_range(self, path: PurePath, offset: int, length: int) -> bytes:
        """`length` bytes of a file from `offset` (one ranged GET on a bucket)."""
        if not self.remote:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        with self._filesystem.open_input_file(str(path)) as fh:
            return fh.read_at(length, offset)

    def open_run(self, run_dir: PurePath) -> Any:
        """The run in `run_dir` as an `expman.Run` (RunNotFoundError without run.yaml)."""
        from expman import open_run

        if not self.remote:
            return open_run(run_dir)
        return open_run(str(run_dir), filesystem=self._filesystem)

    @property
    def _filesystem(self) -> Any:
        assert isinstance(self.files, ArrowFiles)
        return self.files.filesystem
