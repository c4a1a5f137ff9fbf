"""Writes that fail (ENOSPC, EIO): said at once, then every 30 s while they last, and when they stop."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("expman.collector")

LOG_EVERY_S = 30.0


class WriteFailures:
    """The collector's account of failing writes; frames it could not store are `refused`."""

    def __init__(self) -> None:
        self.since: float | None = None  # monotonic time of the first failed write, until one works
        self._logged_at = 0.0
        self.refused = 0

    def failed(self, exc: OSError, what: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
            self.refused = 0
            self._logged_at = now
            log.error("cannot write (%s: %s); not acknowledging what is not stored: senders keep "
                      "their frames (and spill them) until space returns", what, exc)
        elif now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.error("still cannot write for %.0f s (%s: %s); %d frames refused so far",
                      now - self.since, what, exc, self.refused)

    def turn_done(self, applied: int, refused: int) -> None:
        """After a turn: count what was refused, or say that writing works again."""
        if refused:
            self.refused += refused
        elif applied and self.since is not None:
            log.warning("writing works again after %.0f s; %d frames were refused meanwhile (their senders resent them)",
                        time.monotonic() - self.since, self.refused)
            self.since = None
