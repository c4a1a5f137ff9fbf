"""Where each rank stands: one definition of steps per second, lag and stragglers.

`Run.rank_stats()`, `expman show` and the TUI's Ranks tab all call `rank_progress`, so
they agree on the same run:

- last step: the highest step stored for the rank (run.yaml keeps it current; a caller
  that has read the points passes what it saw);
- steps per second: over the rank's stored points, (last step - first step) / (time of
  the last - time of the first), where the caller has them (a `StepSpan`); otherwise the
  last step over the seconds the rank has run, from its start to its end, or to its last
  heartbeat while it runs;
- lag: how many steps the rank is behind the furthest rank;
- straggler: a running rank at least STRAGGLER_MIN_LAG steps and STRAGGLER_LAG_FRACTION
  of the way behind, or silent (no heartbeat) for SILENT_AFTER_S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from expman._storage.layout import parse_time

STRAGGLER_LAG_FRACTION = 0.05
STRAGGLER_MIN_LAG = 10
SILENT_AFTER_S = 10.0


@dataclass(frozen=True)
class StepSpan:
    """A rank's stored points at a glance: its first and last step and their times."""

    first_step: int
    last_step: int
    first_time: float
    last_time: float

    @property
    def steps_per_s(self) -> float | None:
        seconds = self.last_time - self.first_time
        return (self.last_step - self.first_step) / seconds if seconds > 0 else None


@dataclass(frozen=True)
class RankProgress:
    rank: int
    host: str
    status: str
    last_step: int | None
    steps_per_s: float | None
    lag_steps: int | None
    last_heartbeat: float | None  # seconds since the epoch
    heartbeat_age_s: float | None  # for a running rank: seconds since its last heartbeat
    straggler: bool


def rank_progress(info: Mapping[str, Any], now: float,
                  spans: Mapping[int, StepSpan] | None = None) -> list[RankProgress]:
    """One row per rank of run.yaml's `ranks` (and any rank with stored points), by rank."""
    ranks = {int(r): (state or {}) for r, state in (info.get("ranks") or {}).items()}
    spans = dict(spans or {})
    stored = {rank: span.last_step for rank, span in spans.items()}
    run_started = parse_time(info.get("started_at"))
    last_steps = {}
    for rank in set(ranks) | set(stored):
        written = ranks.get(rank, {}).get("last_step")
        candidates = [s for s in (written, stored.get(rank)) if isinstance(s, int) and not isinstance(s, bool)]
        last_steps[rank] = max(candidates) if candidates else None
    known = [s for s in last_steps.values() if s is not None]
    furthest = max(known) if known else None
    rows = []
    for rank in sorted(last_steps):
        state = ranks.get(rank, {})
        step = last_steps[rank]
        status = str(state.get("status") or "unknown")
        heartbeat = parse_time(state.get("last_heartbeat"))
        start = parse_time(state.get("started_at")) or run_started
        end = parse_time(state.get("ended_at")) or heartbeat
        rate = spans[rank].steps_per_s if rank in spans else None
        if rate is None and step is not None and start is not None and end is not None and end > start:
            rate = step / (end - start)
        lag = furthest - step if furthest is not None and step is not None else None
        age = now - heartbeat if heartbeat is not None and status == "running" else None
        behind = lag is not None and lag >= STRAGGLER_MIN_LAG and lag > STRAGGLER_LAG_FRACTION * (furthest or 0)
        silent = age is not None and age > SILENT_AFTER_S
        rows.append(RankProgress(rank, str(state.get("host") or ""), status, step, rate, lag, heartbeat, age,
                                 status == "running" and (behind or silent)))
    return rows
