"""One group commit per turn: every run a turn touched becomes durable together.

A collector holding hundreds of live runs would otherwise fsync each touched run's WAL
every turn, and the cost of a turn would grow with the number of runs instead of the
number of points. Each run's WAL is written, then one syncfs(2) commits the filesystem
they share (Linux); where there is no syncfs, or while parts are being written in the
background (syncfs would flush those too, and the acks would wait for them), the runs'
fsyncs go out side by side on a few threads, which the filesystem's journal commits together.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from expman._storage.wal import SegmentWriter

SYNC_THREADS = 8  # without syncfs: fsyncs in flight at once


class GroupCommit:
    """Makes runs (anything with `sync(fsync)` and `committed(ok)`: collector/_runs.py) durable."""

    def __init__(self, root: Path, writing: Callable[[], bool] | None = None) -> None:
        self.root = root
        # While parts are being written beside the loop (collector/_background.py), syncfs
        # would wait for their megabytes too: the runs' own fsyncs go out instead.
        self.writing = writing or (lambda: False)
        self._root_fd: int | None = None  # a handle on the root's filesystem, for syncfs
        self._pool: ThreadPoolExecutor | None = None

    def sync(self, runs: set[Any]) -> list[tuple[Any, OSError]]:
        """Make what the runs appended durable; returns the runs that failed, with why."""
        commit = SegmentWriter.sync_filesystem
        if len(runs) <= 1 or commit is None or self.writing():
            return self._each(runs)
        failed: list[tuple[Any, OSError]] = []
        written = []
        for run in runs:
            try:
                run.sync(fsync=False)
                written.append(run)
            except OSError as exc:
                failed.append((run, exc))
        try:
            if self._root_fd is None:
                self._root_fd = os.open(self.root, os.O_RDONLY)
            commit(self._root_fd)
        except OSError as exc:
            for run in written:
                run.committed(False)
                failed.append((run, exc))
        else:
            for run in written:
                run.committed(True)
        return failed

    def _each(self, runs: set[Any]) -> list[tuple[Any, OSError]]:
        def sync(run: Any) -> OSError | None:
            try:
                run.sync()
            except OSError as exc:
                return exc
            return None

        if len(runs) <= 1:
            results = [(run, sync(run)) for run in runs]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="expman-sync")
            ordered = list(runs)
            results = list(zip(ordered, self._pool.map(sync, ordered)))
        return [(run, exc) for run, exc in results if exc is not None]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
