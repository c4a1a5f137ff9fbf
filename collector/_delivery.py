"""What the collector has taken from each sender: sequence windows (duplicates, the ack
floor a frame may claim) and what one turn of the loop answers."""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from expman._wire.frames import Frame


class SeqWindow:
    """The sequence numbers seen from one sender: a floor plus sorted [lo, hi] ranges above it.

    Each frame also says below which seq the sender has everything acknowledged (`low`);
    those never come again, so the floor moves up to it, but only over numbers this
    collector has seen (`may_raise_to`): a frame cannot make another sender's later frames
    look like duplicates. Ranges keep the window small even when a restarted collector is
    seeded with the frames its predecessors stored.
    """

    __slots__ = ("floor", "ranges")

    def __init__(self) -> None:
        self.floor = 0  # every seq below this has been seen (or will never be sent again)
        self.ranges: list[list[int]] = []  # disjoint, sorted, all above the floor

    def highest(self) -> int:
        """The highest seq seen (-1 when none)."""
        return max(self.floor - 1, self.ranges[-1][1] if self.ranges else -1)

    def may_raise_to(self, low: int, seq: int) -> bool:
        """A floor a frame may set: at most its own seq and one past the highest seen before it."""
        return low <= seq and low <= self.highest() + 1

    def raise_floor(self, low: int) -> None:
        if low > self.floor:
            self.floor = low
            self._normalize()

    def seen(self, seq: int) -> bool:
        if seq < self.floor:
            return True
        i = bisect.bisect_right(self.ranges, [seq, float("inf")]) - 1
        return i >= 0 and self.ranges[i][0] <= seq <= self.ranges[i][1]

    def add(self, seq: int) -> None:
        self.add_range(seq, seq)

    def add_range(self, lo: int, hi: int) -> None:
        bisect.insort(self.ranges, [lo, hi])
        self._normalize()

    def add_many(self, seqs: list[int]) -> None:
        """Many seqs at once: each run of consecutive ones becomes one range, then one merge."""
        if not seqs:
            return
        seqs = sorted(seqs)
        start = prev = seqs[0]
        for seq in seqs[1:]:
            if seq > prev + 1:
                self.ranges.append([start, prev])
                start = seq
            prev = seq
        self.ranges.append([start, prev])
        self.ranges.sort()
        self._normalize()

    def seed(self, floor: int, ranges: list[list[int]]) -> None:
        """Take in what a previous collector recorded (its own file: trusted)."""
        self.floor = max(self.floor, floor)
        self.ranges.extend([int(lo), int(hi)] for lo, hi in ranges)
        self.ranges.sort()
        self._normalize()

    def copy(self) -> SeqWindow:
        other = SeqWindow()
        other.floor = self.floor
        other.ranges = [list(r) for r in self.ranges]
        return other

    def _normalize(self) -> None:
        merged: list[list[int]] = []
        for lo, hi in self.ranges:
            if hi < self.floor:
                continue
            if lo <= self.floor:
                self.floor = hi + 1
                continue
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        while merged and merged[0][0] <= self.floor:  # the floor may have grown into them
            self.floor = max(self.floor, merged.pop(0)[1] + 1)
        self.ranges = merged


Windows = dict[str, tuple[int, list[list[int]]]]  # sender -> (floor, [lo, hi] ranges above it)


class Senders:
    """Every sender's window; the rules for duplicates and for the floor a frame claims."""

    def __init__(self) -> None:
        self.windows: dict[str, SeqWindow] = defaultdict(SeqWindow)
        self.ignored_floors = 0

    def is_duplicate(self, frame: Frame) -> bool:
        """Raise the sender's floor to the frame's `low` where it may, then: seen before?"""
        assert frame.seq is not None
        window = self.windows[frame.sender]
        if frame.low > window.floor:
            if window.may_raise_to(frame.low, frame.seq):
                window.raise_floor(frame.low)
            else:  # a floor above anything seen from that sender: not this frame's to claim
                self.ignored_floors += 1
        return window.seen(frame.seq)

    def seen(self, sender: str, seq: int) -> bool:
        return self.windows[sender].seen(seq)

    def mark(self, sender: str, seq: int) -> None:
        self.windows[sender].add(seq)

    def seed(self, stored: dict[str, list[list[int]]], delivered: Windows) -> None:
        """What a run's files say was taken before a restart: a resend is a duplicate."""
        for sender, ranges in stored.items():
            for lo, hi in ranges:
                self.windows[sender].add_range(lo, hi)
        for sender, (floor, ranges) in delivered.items():
            self.windows[sender].seed(floor, ranges)

    def snapshot(self, senders: set[str], extra: dict[str, list[int]] | None = None,
                 made: Windows | None = None) -> Windows:
        """These senders' windows, with the seqs in `extra` (sender -> seqs) as if marked.
        `made`: windows already made this turn with the same `extra`, reused and added to
        (many runs share a sender: each sender's window is made once a turn, not once a run)."""
        made = {} if made is None else made
        out: Windows = {}
        for sender in senders:
            if sender not in made:
                window = self.windows[sender].copy()
                if extra and sender in extra:
                    window.add_many(extra[sender])
                made[sender] = (window.floor, window.ranges)
            out[sender] = made[sender]
        return out


@dataclass(eq=False)
class Applied:
    """A frame applied this turn, acknowledged only once it is durable."""

    identity: bytes
    sender: str
    seq: int
    run: Any
    info: dict[str, Any] | None
    store: Any  # the run's metrics store for a metrics frame, else None
    rollbacks: int  # the store's failed syncs before this frame


@dataclass
class Turn:
    """What one turn gathers before it answers: acks and facts per sender identity."""

    acks: dict[bytes, list[int]] = field(default_factory=lambda: defaultdict(list))
    infos: dict[bytes, dict[int, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    unknown: dict[bytes, set[str]] = field(default_factory=lambda: defaultdict(set))
    touched: set[Any] = field(default_factory=set)
    applied: list[Applied] = field(default_factory=list)
    this_turn: set[tuple[str, int]] = field(default_factory=set)
    failed: set[Any] = field(default_factory=set)  # a write for this run failed: its non-metrics frames wait

    def refuse(self, identity: bytes, seq: int, reason: str) -> None:
        self.acks[identity].append(seq)
        self.infos[identity][seq] = {"rejected": reason[:1000]}
