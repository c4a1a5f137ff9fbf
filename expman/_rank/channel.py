"""One run as the sender thread sees it: its identity, the hand-over buffers, its delivery state.

The Experiment (on the user's threads) appends to `points`, `texts` and `control` and asks
for the finish; the sender thread (expman/_rank/sender.py) and the artifact pump
(expman/_rank/artifacts.py) drain them and report back through `finished`, `run_dir` and
the counters. This object is all the two sides share, so neither reaches into the other.

Plain points go into the run's point ring (`ring`, expman/_storage/ring.py), which the
sender reads as frame columns; `points` is the flat Python list for the rest: (key id,
value, step, time) per point, four items each (expman/_wire/columns.py packs it), used
for device tensors, when the run has no ring, and while the ring has no free slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from expman._storage.ring import PointRing

log = logging.getLogger("expman")


@dataclass
class ArtifactState:
    """One run's artifact counters; `open_jobs` holds its finish frame back."""

    encrypt: bool = False
    open_jobs: int = 0
    stored: int = 0
    failed: int = 0


class RunChannel:
    """The per-run state shared by an Experiment and the sender thread that delivers it."""

    def __init__(self, *, uid: str, host: str, rank: int, root: Path, hello: dict[str, Any],
                 heartbeat_interval: float, run_dir: Path | None = None) -> None:
        self.uid = uid
        self.host = host
        self.rank = rank
        self.root = root
        self.hello = hello  # the hello frame's body, sent first and again after a collector restart
        self.heartbeat_interval = heartbeat_interval
        # written by the Experiment, drained by the sender
        self.key_names: list[str] = []  # key id -> name; appended under the Experiment's intern lock
        self.points: list[Any] = []
        self.texts: list[list[Any]] = []  # [key id, text, step, time]
        self.control: deque[tuple[str, Any]] = deque()  # ("params", dict) / ("log", line) / ("frame", ...)
        self.console: list[list[Any]] = []  # printed lines: [time, "stdout" | "stderr", text] (expman/_rank/console.py)
        self.finish_request: dict[str, Any] | None = None
        self.late = 0  # points and messages logged after finish(): dropped and counted
        self.held = 0  # device tensors put into `points` (expman/_rank/device.py), not yet taken by the sender
        self.inherited_by_fork = False  # this process is a fork of the one that started the run
        self.artifacts = ArtifactState()
        self.ring: PointRing | None = None  # the points in shared memory (set by the Experiment; None: none)
        self.ring_framed = 0  # the ring's points the sender has put in frames (0 .. ring.n)
        self.ring_frames: deque[Any] = deque()  # the sender's ring frames not yet settled, oldest first
        # written by the sender thread
        self.hello_sent = False
        self.finish_sent = False
        self.last_step: int | None = None
        self.device_batches: deque[Any] = deque()  # DeviceBatch: points waiting for their device values, in order
        self.next_heartbeat = 0.0  # monotonic
        self.finished = threading.Event()  # every frame of the run acknowledged, finish included
        self.run_dir = run_dir  # where the collector keeps the run, once known
        self.run_dir_known = threading.Event()
        if run_dir is not None:
            self.run_dir_known.set()

    def post(self, kind: str, payload: Any) -> bool:
        """Queue a parameters, log or prepared frame for the sender; False (counted, logged)
        once the run is finished."""
        if self.finish_request is not None or self.inherited_by_fork:
            log.error("expman: %s; %s dropped", self.why_closed(), kind)
            self.late += 1
            return False
        self.control.append((kind, payload))
        return True

    def unframed(self) -> int:
        """Points in the ring the sender has not put in a frame yet."""
        ring = self.ring
        return 0 if ring is None else ring.n - self.ring_framed

    def framed(self, seq: int | None, end: int) -> None:
        """The sender made a metrics frame `seq` (None: dropped) of the ring's points up to
        `end`: said in the ring before the frame can reach the collector (sender thread)."""
        self.ring_framed = end
        ring = self.ring
        if ring is not None:
            ring.framed(-1 if seq is None else seq, end, time.time())

    def settle_ring(self, sent_before: float | None = None) -> None:
        """Free the ring's slots of the oldest frames the collector stored (or that went to
        the spool, or were dropped), and with `sent_before` (monotonic) also of those handed
        to ZeroMQ before then; open the ring again if the list that closed it is framed
        (sender thread)."""
        ring = self.ring
        if ring is None:
            return
        upto = None
        frames = self.ring_frames
        while frames and (frames[0].settled or sent_before is not None and frames[0].sent_at is not None
                          and frames[0].sent_at <= sent_before):
            upto = frames.popleft().ring_end
        if upto is not None:
            ring.settle(upto)
        self.open_ring()

    def open_ring(self) -> None:
        """Let the hot path write into the ring again once nothing waits in the list: the
        list's points would otherwise be framed after later ones (sender thread)."""
        ring = self.ring
        if ring is not None and self.finish_request is None and not self.points and not self.held \
                and not self.device_batches:
            room = ring.settled + ring.capacity - ring.base  # no call since the checks: no append between
            room = ring.capacity if room > ring.capacity else room
            ring.stop = ring.ready if ring.ready < room else room  # the first lap: only what is mapped

    def forget_ring(self) -> None:
        """Delete the run's ring once nothing in it needs recovery: every point stored
        (finish), or every point framed and what is unacknowledged in the spool (the
        sender's exit)."""
        ring = self.ring
        if ring is not None and not self.points and not self.device_batches and not self.unframed():
            self.ring = None
            ring.remove()

    def why_closed(self) -> str:
        """Why nothing more is delivered for this run (for the one warning a caller logs)."""
        if self.inherited_by_fork:
            return (f"run {self.uid} was started by the process this one was forked from, and only that "
                    f"process delivers it (call expman.start_experiment() here to log from this process)")
        return f"run {self.uid} is finished; what is logged after finish() is not stored"

    def confirm_run_dir(self, path: str) -> None:
        """The collector's answer: the run's folder as it sees it (sender thread)."""
        self.run_dir = Path(path)
        self.run_dir_known.set()
