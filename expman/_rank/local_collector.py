"""Local mode: a private collector process started on demand for this training process.

It runs in its own session, so a Ctrl-C aimed at the training script does not kill it
before the script has flushed, and it watches our PID so it never outlives us for long:
when we die (kill -9, a zombie our launcher has not reaped yet) it first stores every
frame we had sent, then marks our runs crashed and exits. A collector shared by a job's
ranks (`key`) watches each rank's process the same way (`--watch-ranks`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("expman")

SHUTDOWN_TIMEOUT_S = 10.0
IDLE_EXIT_S = 10.0  # the collector exits this long after its last run ended; restarted on demand
SHARED_IDLE_EXIT_S = 30.0
_MAX_DIR_CHARS = 60  # ipc paths stop at 107 bytes; "job-<key>/collector.sock" takes ~40 of them


def _is_collector(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
        return b"expman.collector" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def runtime_dir() -> Path:
    """A private (0700) folder for sockets, the same for every process of this user.

    The first of these that is (or can be made) a real folder owned by us: $XDG_RUNTIME_DIR/expman,
    /tmp/expman-<uid>, ~/.local/state/expman/run. Anyone can create /tmp/expman-<uid> first
    (a squatter, or a stale folder of another user with the same uid elsewhere): such a
    folder is skipped with a warning, never trusted and never fatal.
    """
    uid = os.getuid()
    candidates = [Path(tempfile.gettempdir()) / f"expman-{uid}",
                  Path(os.path.expanduser("~")) / ".local" / "state" / "expman" / "run"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.insert(0, Path(os.environ["XDG_RUNTIME_DIR"]) / "expman")
    for path in candidates:
        problem = "a socket path under it would pass the kernel's limit" if len(str(path)) > _MAX_DIR_CHARS else None
        problem = problem or _private_folder(path, uid)
        if problem is None:
            return path
        log.warning("expman: not using %s for the local collector's socket: %s", path, problem)
    return Path(tempfile.mkdtemp(prefix=f"expman-{uid}-"))  # private and unique; no shared collector then


def _private_folder(path: Path, uid: int) -> str | None:
    """Make `path` a 0700 folder of ours; None when it is one, else what is wrong with it."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        return str(exc)
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder (a link or a file)"
    if st.st_uid != uid:
        return f"it belongs to uid {st.st_uid}"
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return None


class LocalCollector:
    """Starts `python -m expman.collector` for one root and restarts it if it dies.

    Private (the default): one per process, a child that exits with us. Shared (`key`,
    the job's run id): one per job and host, found through a socket path every rank of
    the job derives; the first rank to take the folder's lock starts it, detached, and
    it exits on its own once the job's runs have ended. Nobody waits for it to be ready.
    """

    def __init__(self, root: Path | str, key: str | None = None) -> None:  # str: an object storage URI
        self.root = root
        self.key = key
        if key is None:
            self._dir = Path(tempfile.mkdtemp(prefix="c-", dir=runtime_dir()))
        else:
            self._dir = runtime_dir() / f"job-{key}"
            self._dir.mkdir(mode=0o700, exist_ok=True)
        self.endpoint = f"ipc://{self._dir / 'collector.sock'}"
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self.ensure_running()

    def ensure_running(self) -> None:
        with self._lock:
            if self._closed or (self._proc is not None and self._proc.poll() is None):
                return
            if self._proc is not None and self._proc.returncode != 0:
                log.warning("expman: the local collector exited (code %s); starting it again", self._proc.returncode)
            if self.key is None:
                self._proc = self._spawn(["--parent-pid", str(os.getpid()), "--idle-exit", str(IDLE_EXIT_S)])
                return
            with open(self._dir / "lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # held for a pid check and a fork: milliseconds
                if _is_collector(self._dir / "pid"):
                    return
                log_file = open(self._dir / "collector.log", "ab")
                self._proc = self._spawn(["--idle-exit", str(SHARED_IDLE_EXIT_S), "--watch-ranks"], stderr=log_file)
                log_file.close()
                (self._dir / "pid").write_text(str(self._proc.pid))

    def _spawn(self, extra: list[str], stderr: Any = None) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, "-m", "expman.collector",
            "--root", str(self.root),
            "--bind", self.endpoint,
            "--log-level", "WARNING",
            "--socket-mode", "0600",  # only this user's processes may connect (the folder is 0700 too)
            *extra,
        ]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """SIGTERM: the collector flushes every run it holds, then exits."""
        with self._lock:
            self._closed = True
            proc = self._proc
            if self.key is not None:
                return  # shared with the job's other ranks: it leaves by itself when idle
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.error("expman: the local collector did not exit within %.0f s; killing it", timeout)
                    proc.kill()
                    proc.wait()
            shutil.rmtree(self._dir, ignore_errors=True)
