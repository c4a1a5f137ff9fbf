"""Which training processes behind a local collector are gone, zombie or not.

Local mode only. A private collector watches the process that started it (`--parent-pid`);
a local collector (private, or shared by a job's ranks on this host) also watches the
process of each rank, by the pid its hello gave (`--watch-ranks`; the ipc socket is this
user's only). A gone process sends no more frames, so the collector can drain what it had
sent and mark its ranks lost at once, instead of waiting for missed heartbeats.

How "gone" is told, and why:

- Our parent: `os.getppid()` changes as soon as it exits, because the kernel re-parents
  its children before the exiting process becomes a zombie. A zombie that its launcher has
  not reaped yet therefore counts as gone; `kill(pid, 0)` succeeds on a zombie and did not.
- Another process: a pidfd (`os.pidfd_open`, Linux 5.3) polls readable once the process
  has exited, zombie included, and keeps naming that process if the pid is reused. Where
  there are no pidfds: the state in /proc/PID/stat (Z or X is exited), else `kill(pid, 0)`.

`prctl(PR_SET_PDEATHSIG)` is not used: it fires when the *thread* that forked the collector
ends, and any thread of the rank (the sender's, a dataloader's) may be the one that starts it.
"""

from __future__ import annotations

import os
import select

import zmq
from zmq.utils.monitor import parse_monitor_message


class ProcessWatch:
    """Answers "has this process exited?" for our parent and for ranks' pids."""

    def __init__(self, parent_pid: int | None) -> None:
        self.parent_pid = parent_pid
        # Started by it (local mode): then the parent pid can be told apart without a pid lookup.
        self._child_of_parent = parent_pid is not None and os.getppid() == parent_pid
        self._fds: dict[int, int | None] = {}  # pid -> pidfd, or None where pidfds are unavailable

    def parent_gone(self) -> bool:
        """True once the process given as parent has exited (a zombie counts as exited)."""
        if self.parent_pid is None:
            return False
        if self._child_of_parent:
            return os.getppid() != self.parent_pid
        return self.gone(self.parent_pid)

    def gone(self, pid: int) -> bool:
        """True once process `pid` has exited. The first question about a pid opens a pidfd,
        so later answers are about that process even if the pid is reused."""
        if pid not in self._fds:
            try:
                self._fds[pid] = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
            except ProcessLookupError:
                return True  # not even a zombie: exited and reaped
            except OSError:  # an older kernel (ENOSYS), or not allowed: look it up each time
                self._fds[pid] = None
        fd = self._fds[pid]
        if fd is None:
            return _gone_by_pid(pid)
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)

    def watched(self) -> set[int]:
        return set(self._fds)

    def forget(self, pid: int) -> None:
        """Stop watching `pid` (its ranks have ended): closes its pidfd."""
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for pid in list(self._fds):
            self.forget(pid)


def _gone_by_pid(pid: int) -> bool:
    """Without a pidfd: exited when there is no such process or it is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]  # the name in (...) may hold spaces
        return state in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc here (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class OpenConnections:
    """How many peers are connected to the ROUTER, from its socket monitor.

    A connection is reported closed only after ZeroMQ's I/O thread has read it to its end
    and handed every frame in it to the socket, so with no connection open and no frame
    waiting in the socket, everything a dead process sent has been taken in: a drain can
    end at once instead of waiting for quiet."""

    def __init__(self, router: zmq.Socket) -> None:
        self._monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._open = 0

    def count(self) -> int:
        """Connections open as of the monitor's latest news (read without waiting)."""
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return self._open
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._open += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._open = max(0, self._open - 1)

    def close(self) -> None:
        self._monitor.close(0)
