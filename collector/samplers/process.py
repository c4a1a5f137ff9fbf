"""Rank processes, through psutil: CPU %, resident memory, threads, open file descriptors."""

from __future__ import annotations

import logging
from typing import Any, Collection

from . import Reading

log = logging.getLogger("expman.collector")


class ProcessSource:
    """Readings for the processes named in each `sample(pids)` call.

    CPU % is measured from one sample to the next, per process (100 means one whole
    core), so `track(pid)` a process a moment before its first sample; a pid seen for the
    first time in `sample()` gets every reading but CPU % that time.
    """

    def __init__(self, *, psutil: Any = None) -> None:
        if psutil is None:
            import psutil
        self.psutil = psutil
        self._procs: dict[int, Any] = {}
        self._denied: set[tuple[int, str]] = set()

    def track(self, pid: int) -> bool:
        """Start measuring CPU for `pid` now; False if there is no such process."""
        if pid in self._procs:
            return True
        try:
            proc = self.psutil.Process(pid)
            proc.cpu_percent(None)
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, ValueError):
            return False
        self._procs[pid] = proc
        return True

    def sample(self, pids: Collection[int]) -> list[Reading]:
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]  # no longer asked for
        out: list[Reading] = []
        for pid in pids:
            fresh = pid not in self._procs
            if fresh and not self.track(pid):
                continue
            proc = self._procs[pid]
            try:
                with proc.oneshot():
                    cpu = None if fresh else proc.cpu_percent(None)
                    readings = [
                        ("process.cpu_percent", cpu),
                        ("process.rss_bytes", self._get(proc, pid, "rss_bytes", lambda: float(proc.memory_info().rss))),
                        ("process.threads", self._get(proc, pid, "threads", lambda: float(proc.num_threads()))),
                        ("process.open_fds", self._get(proc, pid, "open_fds", lambda: float(self._fds(proc)))),
                    ]
            except self.psutil.NoSuchProcess:
                del self._procs[pid]  # gone (exiting, say); its last readings were the previous sample's
                continue
            out += [Reading(key, value, None, pid) for key, value in readings if value is not None]
        return out

    def _get(self, proc: Any, pid: int, what: str, read: Any) -> float | None:
        try:
            return read()
        except self.psutil.AccessDenied:
            if (pid, what) not in self._denied:
                self._denied.add((pid, what))
                log.info("hardware: no permission to read %s of process %d; skipped", what, pid)
            return None

    @staticmethod
    def _fds(proc: Any) -> int:
        num_fds = getattr(proc, "num_fds", None)
        return num_fds() if num_fds is not None else proc.num_handles()  # Windows has handles, not fds

    def close(self) -> None:
        self._procs.clear()
