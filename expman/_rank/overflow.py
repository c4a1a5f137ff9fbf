"""Frames past a sender's memory budget: spilled to its spool file, read back in order.

The sender (expman/_rank/sender.py) keeps unacknowledged frames in its Outbox up to
`max_buffer_bytes`; past that, further frames come here and go to the sender's spool
file (format: expman/_rank/spool.py) byte for byte, so sequence numbers and the
collector's duplicate check still hold. They return to the Outbox, oldest first, as acks
free memory; at exit whatever is still unacknowledged, in memory or spooled, is written
to the spool file for `expman sync`. Only the sender thread uses an Overflow.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

from expman._rank.spool import Spool, spool_dir, write_final
from expman._wire.delivery import Entry, Outbox

log = logging.getLogger("expman")

RETRY_SPOOL_AFTER_S = 10.0  # after a spool file could not be created


class Overflow:
    """The spilled frames of one sender, and its spool file while there are any."""

    def __init__(self, endpoint: str, sender_id: str, intros: Callable[[], list[bytes]]) -> None:
        self.endpoint = endpoint
        self.sender_id = sender_id
        self._intros = intros  # hello frames (no seq) of the sender's runs, for a replayer
        self._spool: Spool | None = None
        self._spooled: deque[Entry] = deque()  # their entries, data None, in seq order
        self._failed_at = -RETRY_SPOOL_AFTER_S

    def __bool__(self) -> bool:
        return bool(self._spooled)

    @property
    def size(self) -> int:
        return self._spool.size if self._spool is not None else 0

    @property
    def where(self) -> str:
        return str(self._spool.path) if self._spool is not None else "no spool"

    def low(self, low: int) -> int:
        """The ack floor, given the Outbox's: a spilled frame may be older."""
        return min(low, self._spooled[0].seq) if self._spooled else low

    def spill(self, entry: Entry, force: bool, max_bytes: int, in_memory: int) -> bool:
        """Append `entry` to the spool file; False when it is full (unless `force`) or
        cannot be written, and the caller decides what to drop."""
        if self._spool is None:
            if time.monotonic() - self._failed_at < RETRY_SPOOL_AFTER_S:
                return False
            folder = spool_dir()
            try:
                self._spool = Spool(folder, self.endpoint, self.sender_id, self._intros(), max_bytes)
            except OSError as exc:
                self._failed_at = time.monotonic()
                log.error("expman: cannot create a spool file in %s (%s): frames past the memory budget "
                          "are dropped", folder, exc)
                return False
            log.warning("expman: collector at %s is behind by %d MB; spilling further frames to %s",
                        self.endpoint, in_memory >> 20, self._spool.path)
        try:
            if not self._spool.append(entry.data, force):  # type: ignore[arg-type]
                return False
        except OSError as exc:
            log.error("expman: cannot write to the spool %s: %s", self._spool.path, exc)
            return False
        entry.data = None
        self._spooled.append(entry)
        return True

    def load_into(self, outbox: Outbox, max_bytes: int) -> None:
        """Bring spilled frames back into `outbox`, oldest first, as its budget allows."""
        spool = self._spool
        assert spool is not None
        while self._spooled and (not outbox or outbox.bytes + self._spooled[0].size <= max_bytes):
            entry = self._spooled.popleft()
            entry.data = spool.read_next()
            outbox.add(entry)
        if not self._spooled:
            spool.close(delete=True)  # every frame is back in memory (and kept again at exit)
            self._spool = None

    def keep_at_exit(self, outbox: Outbox) -> None:
        """Whatever the collector has not confirmed goes to the spool file, for `expman sync`."""
        spool, self._spool = self._spool, None
        if not outbox and not self._spooled:
            if spool is not None:
                spool.close(delete=True)
            return
        in_memory = sorted(outbox.entries.values(), key=lambda p: p.seq)
        waiting = (*in_memory, *self._spooled)
        runs = {id(p.tag.run): p.tag.run for p in waiting}
        try:
            path = write_final(spool_dir() if spool is None else spool.path.parent, self.endpoint, self.sender_id,
                               self._intros(), [p.data for p in in_memory],  # type: ignore[misc]
                               spool.unread() if spool is not None else b"")
        finally:
            if spool is not None:
                spool.close(delete=False)
        log.error("expman: the collector at %s has not confirmed %d frames (%d points) of run(s) %s; "
                  "they are kept in %s: run `expman sync` to deliver them",
                  self.endpoint, len(waiting), sum(p.tag.points for p in waiting),
                  ", ".join(sorted(r.uid for r in runs.values())), path)
