"""Hardware sources, one per module, each behind the same one-method protocol.

A source is a small class whose `sample(pids)` returns the readings of this moment as
`Reading` tuples; the library handles it uses (psutil, the NVML module) are constructor
arguments, so tests run the real code over canned data or a fake NVML. Sources keep
only what they need to turn counters into rates; scheduling, attribution to runs and
ranks, and writing live in `collector/_hardware.py`.
"""

from __future__ import annotations

from typing import Collection, NamedTuple, Protocol


class Reading(NamedTuple):
    """One value of one moment. `device` names what it measures (a core, an interface,
    a GPU's UUID; None: the host as a whole or a process), `pid` the process it belongs to."""

    key: str
    value: float | None
    device: str | None = None
    pid: int | None = None
    text: str | None = None


class Source(Protocol):
    def sample(self, pids: Collection[int]) -> list[Reading]: ...

    def close(self) -> None: ...


__all__ = ["Reading", "Source"]
