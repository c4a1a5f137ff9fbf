"""Which sequence numbers a sender's frames have used: duplicates, and the ack floor it may claim."""

from __future__ import annotations

import bisect


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
