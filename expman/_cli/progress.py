"""Progress of long CLI work (exports, imports): a bar on a terminal, nothing when piped.

Drawn on stderr, at most a few times a second, and erased when done, so what a command
prints on stdout stays the same whether or not a terminal watched it.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

_REDRAW_S = 0.2
_WIDTH = 30


class Progress:
    """Count done units of work; `total=None` shows a running count instead of a bar."""

    def __init__(self, label: str, unit: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.label = label
        self.unit = unit
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream)
        self._drawn_at = 0.0
        self._drawn = False

    def update(self, count: int) -> None:
        """Add `count` units done; redraw when the last drawing is old enough."""
        self.done += count
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn_at >= _REDRAW_S:
            self._drawn_at = now
            self._draw()

    def line(self) -> str:
        """The text of the bar as it stands (what a terminal sees, less the carriage return)."""
        if self.total:
            share = min(1.0, self.done / self.total)
            filled = int(share * _WIDTH)
            bar = "#" * filled + "-" * (_WIDTH - filled)
            return f"{self.label} [{bar}] {share:4.0%} {self.done:,}/{self.total:,} {self.unit}"
        return f"{self.label}: {self.done:,} {self.unit}"

    def _draw(self) -> None:
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Show the bar complete (when the work is), then erase it, leaving the cursor where
        the command's own output goes."""
        if self._drawn:
            if self.total and self.done >= self.total:
                self._draw()  # the last redraw may have been throttled away
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
