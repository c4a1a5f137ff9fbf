"""A rank's stdout and stderr, captured into its runs without ever making a print wait.

While a run that captures the console is open, `sys.stdout` and `sys.stderr` are wrapped
by a `ConsoleTee`: every write goes through to the original stream first, unchanged, and
each complete line is also queued on the open runs' channels as a log line whose level is
the stream (`stdout` / `stderr`). The sender delivers them like any log line, so they land
in run.log with the time, host and rank (`Run.console()` reads them back as a table). The
queueing is a deque append: nothing in a print waits on the collector.

Only what goes through Python's `sys.stdout` / `sys.stderr` is seen (print, tracebacks,
logging handlers that write there); output that a C library or a subprocess writes to
file descriptors 1 and 2 directly is not.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from expman._rank.channel import RunChannel

CONSOLE_ENV = "EXPMAN_CONSOLE"  # "off" turns capture off for every run of the process
MAX_LINE_CHARS = 64 * 1024  # longer lines are cut (a progress bar without newlines, say)
STREAMS = ("stdout", "stderr")

_lock = threading.RLock()  # detach() takes a tee's last line while holding it
_targets: list[RunChannel] = []


def wanted(capture_console: bool | None) -> bool:
    """The argument when given, else on unless $EXPMAN_CONSOLE is off."""
    if capture_console is not None:
        return bool(capture_console)
    return os.environ.get(CONSOLE_ENV, "").strip().lower() not in ("off", "0", "false", "no")


class ConsoleTee:
    """Stands in for sys.stdout or sys.stderr; everything but `write` is the original's.

    print() calls `write` once per argument and separator, so the common write (no
    newline) is one list append; a newline joins the pieces into lines under a lock.
    """

    def __init__(self, stream_name: str, original: Any) -> None:
        self.stream_name = stream_name
        self.original = original
        self._pieces: list[str] = []

    def write(self, text: str) -> int:
        written = self.original.write(text)
        if "\n" not in text:
            self._pieces.append(text)
            if len(self._pieces) > 4096:  # a progress bar redrawn with \r and never a newline
                self._queue("")
        else:
            try:
                self._queue(text)
            except Exception:  # noqa: BLE001 - capturing must never break a print
                pass
        return written

    def _queue(self, text: str) -> None:
        with _lock:
            pending, self._pieces[:] = "".join(self._pieces) + text, []
            lines = pending.split("\n")
            rest = lines.pop()
            if rest:
                self._pieces.append(rest[-MAX_LINE_CHARS:])
            targets = [c for c in _targets if c.finish_request is None and not c.inherited_by_fork]
        if lines and targets:
            now = time.time()
            entries = [[now, self.stream_name, line.rstrip("\r")[:MAX_LINE_CHARS]] for line in lines]
            for channel in targets:
                channel.console += entries  # one atomic extend; the sender takes the list in slices

    def take_partial(self) -> str:
        """The last line so far, without its newline (and forget it)."""
        with _lock:
            rest, self._pieces[:] = "".join(self._pieces), []
        return rest[-MAX_LINE_CHARS:]

    def flush(self) -> None:
        self.original.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self.original, name)


def attach(channel: RunChannel) -> None:
    """Capture the console into `channel` until `detach` (wraps the streams on first use)."""
    with _lock:
        _targets.append(channel)
        for name in STREAMS:
            current = getattr(sys, name)
            if not isinstance(current, ConsoleTee) and current is not None:
                setattr(sys, name, ConsoleTee(name, current))


def detach(channel: RunChannel) -> None:
    """Stop capturing into `channel`; with no run left, put the original streams back
    (unless someone else has replaced them since)."""
    with _lock:
        if channel not in _targets:
            return
        _targets.remove(channel)
        if _targets:
            return
        for name in STREAMS:
            current = getattr(sys, name)
            if isinstance(current, ConsoleTee):
                rest = current.take_partial()  # a last line without its newline
                if rest:
                    channel.console.append([time.time(), name, rest])
                setattr(sys, name, current.original)
