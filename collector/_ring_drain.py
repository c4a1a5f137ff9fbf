"""A dead rank's point ring, stored: the points its `log_metric` had accepted that never
reached this collector (expman/_storage/ring.py has the file's format).

Asked when a rank is about to be marked lost (its process gone, or its heartbeats
stopped), after the frames it had sent were taken in. Rings are on this host only, so
only ranks on the collector's own host, under the same user, are recovered. The points
become ordinary metrics frames that go through the receive loop's own checks, WAL and
duplicate rules: a frame the sender had made keeps its sender and seq (a later resend or
`expman sync` of it is then a duplicate), the points after the last frame go under the
sender id `<sender>-ring` with the ring's end as seq (recovering twice stores them once).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path
from typing import Callable

from expman._storage.ring import (HAS_STEP, HAS_TIME, Recovered, is_abandoned, private_folder, read_ring, ring_dirs,
                                  ring_path, updated_at)
from expman._wire import columns
from expman._wire import frames as proto
from expman._wire.limits import MAX_ID

log = logging.getLogger("expman.collector")

STALE_S = 120.0  # an abandoned ring untouched this long has no collector left to recover it
RECOVERY_SENDER_SUFFIX = "-ring"


class RingDrain:
    """Finds the rings of a run's rank and turns what they hold beyond what was stored into frames."""

    def __init__(self, stored: Callable[[str, int], bool], folders: list[Path] | None = None) -> None:
        self.folders = folders or ring_dirs()
        self._stored = stored
        self.recovered = 0  # points, since start
        self.unrecoverable = 0  # overwritten before they were stored, or device tensors

    def clean_stale(self) -> int:
        """At start: delete rings (and half-made ones) whose writer is gone and that no
        collector touched for STALE_S: their runs ended long ago. Returns how many."""
        removed = 0
        now = time.time()
        for path in self._files("*.ring", "*.tmp*"):
            try:
                old = now - (updated_at(path) if path.suffix == ".ring" else path.stat().st_mtime) > STALE_S
                if old and is_abandoned(path):
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("removed %d abandoned point rings from %s", removed, ", ".join(map(str, self.folders)))
        return removed

    def _files(self, *patterns: str) -> list[Path]:
        """Matching files of the ring folders that are private to this user (others are not read)."""
        found: list[Path] = []
        for folder in self.folders:
            if private_folder(folder, make=False):
                try:
                    found += [p for pattern in patterns for p in folder.glob(pattern)]
                except OSError:
                    continue
        return found

    def recover(self, run: str, rank: int, senders: set[str], store: Callable[[list[bytes]], None]) -> int:
        """Store what the rings of (run, rank) hold that was never stored, for every sender
        of the run whose process is gone; delete each ring once stored. Returns the points."""
        total = 0
        folders = [f for f in self.folders if private_folder(f, make=False)]  # not one someone else could write
        for sender, folder in sorted((s, f) for s in senders for f in folders):
            path = ring_path(folder, sender, run, rank)
            if not is_abandoned(path):
                continue  # no ring, or its writer still lives (silent, not dead): its frames may still come
            found = read_ring(path, self._stored)
            if found is None or (found.sender, found.run, found.rank) != (sender, run, rank):
                log.warning("run %s rank %d: %s is not this rank's point ring; left alone", run, rank, path)
                continue
            store([_frame(found, seq, sent_at, points) for seq, sent_at, points in found.frames])
            count = sum(len(points) for _seq, _t, points in found.frames)
            total += count
            self.recovered += count
            self.unrecoverable += found.lost + found.device
            log.warning("run %s rank %d: stored %d points from the dead process's ring%s", run, rank, count,
                        f" ({found.lost} overwritten before they were stored, {found.device} device values unread)"
                        if found.lost or found.device else "")
            try:
                os.unlink(path)
            except OSError:
                pass
        return total


def recovery_sender(sender: str) -> str:
    """The sender id of the points a rank never put in a frame (within the wire's id limit)."""
    return sender[: MAX_ID - len(RECOVERY_SENDER_SUFFIX)] + RECOVERY_SENDER_SUFFIX


def _frame(found: Recovered, seq: int | None, sent_at: float, points: list[tuple[int, int, float, int, float]]) -> bytes:
    """One metrics frame of recovered points, built with the wire's own column packer."""
    n = len(points)
    ids = [p[0] for p in points]
    with_steps = all(p[1] & HAS_STEP for p in points)
    steps: bytes | list[int | None] = (struct.pack(f"<{n}q", *(p[3] for p in points)) if with_steps
                                       else [p[3] if p[1] & HAS_STEP else None for p in points])
    times = [p[4] if p[1] & HAS_TIME else None for p in points]
    body = columns.metrics_body({k: found.names[k] for k in set(ids)}, struct.pack(f"<{n}i", *ids),
                                struct.pack(f"<{n}d", *(p[2] for p in points)), steps,
                                times if any(t is not None for t in times) else None, None)
    sender, number = (found.sender, seq) if seq is not None else (recovery_sender(found.sender), found.end)
    return proto.encode_frame(proto.METRICS, run=found.run, host=found.host, rank=found.rank, sender=sender,
                              seq=number, sent_at=sent_at, body=body)
