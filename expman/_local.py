"""Local mode: a private collector process started on demand for this training process.

It runs in its own session, so a Ctrl-C aimed at the training script does not kill it
before the script has flushed, and it watches our PID so it never outlives us for long.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("expman")

SHUTDOWN_TIMEOUT_S = 10.0
IDLE_EXIT_S = 10.0  # the collector exits this long after its last run ended; restarted on demand


def runtime_dir() -> Path:
    """A private (0700) folder for sockets: $XDG_RUNTIME_DIR/expman or /tmp/expman-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "expman" if base else Path(tempfile.gettempdir()) / f"expman-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise PermissionError(f"runtime folder {path} belongs to another user")
    os.chmod(path, 0o700)
    return path


class LocalCollector:
    """Starts `python -m expman.collector` for one root and restarts it if it dies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir = Path(tempfile.mkdtemp(prefix="c-", dir=runtime_dir()))
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
            cmd = [
                sys.executable, "-m", "expman.collector",
                "--root", str(self.root),
                "--bind", self.endpoint,
                "--parent-pid", str(os.getpid()),
                "--idle-exit", str(IDLE_EXIT_S),
                "--log-level", "WARNING",
            ]
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """SIGTERM: the collector flushes every run it holds, then exits."""
        with self._lock:
            self._closed = True
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.error("expman: the local collector did not exit within %.0f s; killing it", timeout)
                    proc.kill()
                    proc.wait()
            shutil.rmtree(self._dir, ignore_errors=True)
