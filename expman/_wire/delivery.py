"""The delivery policy: which frames wait for an acknowledgement, and when each is sent again.

A rule, not a socket. The rank's sender loop (expman/_rank/sender.py) and `expman sync`
(expman/_rank/sync.py) both keep their unacknowledged frames in an `Outbox`, ask it what
to send now, and tell it what went out and what the collector acknowledged; the sockets
stay theirs. The collector drops duplicates, so sending a frame twice is always safe,
only wasteful: a frame is sent again only once it has waited well past the usual ack
latency, and each resend of it doubles its wait; and only when it looks lost, not merely
queued: the collector acknowledged a frame sent after it (one connection delivers in
order, so this one was skipped), or it has acknowledged nothing for as long (it is gone
or restarted). A collector that is alive but behind is never buried in duplicates. The
owner also sends everything unacknowledged again when it learns of a cause (`resend_all`:
a new connection; `resend_where`: a restarted collector asked for a run's hello), and a
sender that only waits for acks sleeps until `next_resend_at`.

`SendWindow` is the rule for when a run's logged points become a frame at all: the
collector pays per frame (~35-65 µs) far more than per point (~3 µs), so a slow run's
points wait a little to share one.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

RESEND_AFTER_S = 2.0  # at least; more when acks are slow
MAX_RESEND_AFTER_S = 30.0
MAX_BACKOFF_DOUBLINGS = 5
SEND_WINDOW_S = 0.1  # the longest a slow run's point waits in the rank for others to share its frame
MAX_SEND_WINDOW_S = 1.0  # ... when the collector is slow to acknowledge
BATCH_POINTS = 256  # this many points waiting make a frame worth sending at once


@dataclass(slots=True)
class Entry:
    """One frame waiting for its acknowledgement. `tag` is the owner's (run, kind, counts)."""

    seq: int
    data: bytes | None  # None while the owner keeps it elsewhere (the sender's spool)
    size: int
    tag: Any = None
    sent_at: float | None = None  # None: not sent yet, or due again
    first_sent_at: float | None = None
    resends: int = 0
    timeouts: int = 0  # resends because no ack came in time: each doubles the next wait
    sent_order: int = -1  # the Outbox's count of sends when this one last went out


class SendWindow:
    """When a run's waiting points go out: at once when there are enough of them to be
    worth a frame (a fast run keeps the sender's every-tick pace), else at the end of their
    send window. A run logging 100 steps/s thus sends ~13 frames a second instead of one
    every tick; a finish never waits (the sender does not ask), heartbeats are not points.

    Windows end on a grid of half-windows shared by every run (and every process: the
    clock is the system's monotonic one), so the sender wakes for them at most twice a
    window however many runs it holds; a point waits between half a window and a window.
    A collector slow to acknowledge is a busy one: the window follows its ack latency up
    to `longest`, so a saturated collector gets fewer, larger frames. `window` 0 sends
    every tick."""

    def __init__(self, window: float = SEND_WINDOW_S, points: int = BATCH_POINTS,
                 longest: float = MAX_SEND_WINDOW_S) -> None:
        self.base = self.window = max(window, 0.0)
        self.points = points
        self.longest = max(longest, self.base)

    def follow(self, ack_latency: float) -> None:
        """Widen (or narrow back) the window to 4x the collector's usual ack latency."""
        if self.base > 0:
            self.window = min(max(self.base, 4 * ack_latency), self.longest)

    def holds(self, waiting: int, since: float | None, now: float) -> bool:
        """Whether `waiting` points, the oldest seen at `since` (None: just now), wait."""
        if waiting >= self.points or self.window <= 0:
            return False
        return since is None or now < self.ends(since)

    def ends(self, since: float) -> float:
        """When points first seen at `since` go out at the latest."""
        half = self.window / 2
        return (since // half + 2) * half


class Outbox:
    """Unacknowledged frames in sequence order, with the resend and ack-floor rules."""

    def __init__(self, resend_after: float = RESEND_AFTER_S) -> None:
        self.min_resend_after = resend_after
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.bytes = 0  # sizes of the entries held
        self.ack_latency = 0.0  # seconds, moving average of first sends
        self._unsent: deque[int] = deque()  # seqs to send, in order
        self._low_heap: list[int] = []  # seqs of entries, lazily cleaned: the oldest unacked
        self._sends = 0
        self._acked_order = -1  # the latest send (sent_order) acknowledged
        self._last_ack_at: float | None = None  # monotonic time of the last ack of anything

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def has_due(self) -> bool:
        """Whether some entry waits to be sent (or sent again)."""
        return bool(self._unsent)

    def add(self, entry: Entry) -> None:
        """Hold `entry` until it is acknowledged; it goes out on the next `due()`."""
        self.entries[entry.seq] = entry
        heapq.heappush(self._low_heap, entry.seq)
        self._unsent.append(entry.seq)
        self.bytes += entry.size

    def due(self) -> Iterator[Entry]:
        """Entries to send now, oldest first. Stop iterating when the socket says no; an
        entry counts as sent only once `sent()` is called for it."""
        while self._unsent:
            entry = self.entries.get(self._unsent[0])
            if entry is None or entry.sent_at is not None:
                self._unsent.popleft()  # acknowledged meanwhile, or already resent
                continue
            yield entry

    def sent(self, entry: Entry, now: float) -> None:
        if self._unsent and self._unsent[0] == entry.seq:
            self._unsent.popleft()
        entry.sent_at = now
        entry.sent_order = self._sends
        self._sends += 1
        if entry.first_sent_at is None:
            entry.first_sent_at = now

    @property
    def resend_after(self) -> float:
        """Resend only frames unacknowledged for well past the usual ack latency, so a busy
        collector is not buried in duplicates."""
        return min(max(self.min_resend_after, 4 * self.ack_latency), MAX_RESEND_AFTER_S)

    def expire(self, now: float) -> list[Entry]:
        """Mark entries that waited too long for their ack, and look lost, as due again;
        return them."""
        base = self.resend_after
        silent = self._last_ack_at is None or now - self._last_ack_at > base
        skipped_below = self._acked_order  # sent before a frame that was acknowledged
        stale = []
        for entry in self.entries.values():
            if (entry.sent_at is not None and (silent or entry.sent_order < skipped_below)
                    and now - entry.sent_at > base * 2 ** min(entry.timeouts, MAX_BACKOFF_DOUBLINGS)):
                stale.append(entry)
        for entry in stale:
            entry.timeouts += 1
            self.resend_now(entry)
        return stale

    def next_resend_at(self) -> float | None:
        """When `expire` will next find a frame to send again that the collector, while it
        answered others, left unanswered: one it skipped (it acknowledged a frame sent
        later), or one sent before its last answer, once it has been silent for a resend
        wait since. None if there is none. Frames sent into a silence are not counted: a
        stopped collector reads what is queued once it runs again, and a lost connection is
        ZeroMQ's to report (`resend_all`), so a sender waiting only for acks need not wake."""
        base = self.resend_after
        last_ack = self._last_ack_at
        times = []
        for entry in self.entries.values():
            if entry.sent_at is None:
                continue
            due = entry.sent_at + base * 2 ** min(entry.timeouts, MAX_BACKOFF_DOUBLINGS)
            if entry.sent_order < self._acked_order:
                times.append(due)
            elif last_ack is not None and entry.sent_at < last_ack:
                times.append(max(due, last_ack + base))
        return min(times, default=None)

    def resend_all(self) -> list[Entry]:
        """Mark every frame sent and not acknowledged as due again (its connection was lost,
        and with it whatever ZeroMQ still queued); return them."""
        return self.resend_where(lambda entry: True)

    def resend_now(self, entry: Entry) -> None:
        """Send `entry` again at the next `due()` (say, the collector forgot its run). Only
        a resend for want of an ack (`expire`) lengthens the frame's next wait: one for a
        known cause (a new connection, a restarted collector) is no sign of a slow one."""
        entry.sent_at = None
        entry.resends += 1
        self._unsent.append(entry.seq)

    def resend_where(self, wanted: Callable[[Entry], bool]) -> list[Entry]:
        """Mark the frames sent, not acknowledged and `wanted` as due again; return them."""
        entries = [entry for entry in self.entries.values() if entry.sent_at is not None and wanted(entry)]
        for entry in entries:
            self.resend_now(entry)
        return entries

    def acked(self, seq: int, now: float) -> Entry | None:
        """Forget an acknowledged entry and return it; None for an ack of nothing we hold."""
        self._last_ack_at = now  # any answer says the collector is there
        entry = self.entries.pop(seq, None)
        if entry is None:
            return None  # a duplicate ack after a resend
        self.bytes -= entry.size
        self._acked_order = max(self._acked_order, entry.sent_order)
        if entry.first_sent_at is not None and entry.resends == 0:
            self.ack_latency += 0.2 * (now - entry.first_sent_at - self.ack_latency)
        return entry

    def low(self, default: int) -> int:
        """The oldest unacknowledged seq, else `default` (the ack floor a frame carries)."""
        heap = self._low_heap
        while heap and heap[0] not in self.entries:
            heapq.heappop(heap)
        if len(heap) > 2 * len(self.entries) + 1024:  # acked seqs stuck behind an old one
            self._low_heap = heap = list(self.entries)
            heapq.heapify(heap)
        return heap[0] if heap else default
