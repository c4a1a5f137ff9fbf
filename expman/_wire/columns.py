"""Metric columns: how points travel from a rank's buffer to the collector, both ways.

The one owner of the layout. The rank's hot path (expman/_rank/experiment.py) appends
each point to a flat list as POINT_STRIDE items, (key id, value, step, time), with time
None unless the caller gave one; `pack` turns a slice of that list into a metrics
frame's body. The body is columnar: key ids (int32), values (float64) and steps (int64,
or a list with None for missing) as little-endian binary fields, so packing costs the
rank a memcpy and the collector decodes millions of points per second without Python
loops (`read_metrics_body`, then expman/_storage/rows.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

from expman._errors import ProtocolError

POINT_STRIDE = 4  # key id, value, step, time
FULL_KEY_TABLE = 256  # below this many keys every frame carries the whole key table
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def fits_int64(step: Any) -> bool:
    return step is not None and _INT64_MIN <= step <= _INT64_MAX


def pack(buf: list[Any], start: int, stop: int, key_names: list[str], texts: list[list[Any]],
         warn: Callable[[str], None]) -> tuple[dict[str, Any], int, int | None]:
    """The body of one metrics frame from points buf[start:stop] (a multiple of
    POINT_STRIDE) and `texts`; also its point count and last step (None if it has none).

    Runs on the sender thread holding the GIL, so it is C-level slicing and `struct.pack`
    only (about 60 ns a point, no Python loop). Strided slices of the live list are safe:
    items below `stop` never move while the caller holds them, the hot path only appends.
    `warn` hears about values it had to change (too large for float64, steps outside int64).
    """
    ids = buf[start:stop:POINT_STRIDE]
    values = buf[start + 1 : stop : POINT_STRIDE]
    steps = buf[start + 2 : stop : POINT_STRIDE]
    times = buf[start + 3 : stop : POINT_STRIDE]
    count = len(ids)
    if len(key_names) <= FULL_KEY_TABLE:
        keys = dict(enumerate(key_names[:]))
    else:
        keys = {i: key_names[i] for i in set(ids).union(t[0] for t in texts)}
    body = metrics_body(
        keys,
        struct.pack(f"<{count}i", *ids),
        _pack_values(values, warn),
        _pack_steps(steps, warn),
        None if times.count(None) == count else times,
        texts,
    )
    last = steps[-1] if count and fits_int64(steps[-1]) else None
    return body, count, last


def _pack_values(values: list[Any], warn: Callable[[str], None]) -> bytes:
    try:
        return struct.pack(f"<{len(values)}d", *values)
    except (OverflowError, struct.error):  # an int too large for a float64: store it as ±inf, and say so
        warn("a metric value is too large for float64; stored as inf")
        return struct.pack(f"<{len(values)}d", *(_clamp(v) for v in values))


def _clamp(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def _pack_steps(steps: list[Any], warn: Callable[[str], None]) -> bytes | list[int | None]:
    """int64 binary when every point has a step, else a list with None (msgpack nil)."""
    try:
        return struct.pack(f"<{len(steps)}q", *steps)
    except struct.error:  # a None (no step), or out of range
        pass
    if all(s is None or fits_int64(s) for s in steps):
        return steps
    warn("a step outside the int64 range is stored as no step")
    return [s if fits_int64(s) else None for s in steps]


def metrics_body(
    keys: dict[int, str],
    ids: bytes,
    values: bytes,
    steps: bytes | list[int | None],
    times: list[float | None] | None,
    texts: list[list[Any]] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"keys": keys, "ids": ids, "values": values, "steps": steps}
    if times is not None:
        body["times"] = times
    if texts:
        body["texts"] = texts
    return body


@dataclass(frozen=True, slots=True)
class MetricsBatch:
    """The checked fields of a metrics body; binary columns stay as bytes."""

    keys: dict[int, str]
    ids: bytes
    values: bytes
    steps: bytes | list[int | None]
    times: list[float | None] | None
    texts: list[list[Any]]

    @property
    def count(self) -> int:
        return len(self.ids) // 4


def read_metrics_body(body: dict[str, Any]) -> MetricsBatch:
    keys, ids, values, steps = body.get("keys"), body.get("ids"), body.get("values"), body.get("steps")
    times, texts = body.get("times"), body.get("texts") or []
    if not isinstance(keys, dict) or not all(isinstance(k, int) and isinstance(v, str) for k, v in keys.items()):
        raise ProtocolError("bad-shape", "metrics keys must map int ids to names")
    if not isinstance(ids, bytes) or not isinstance(values, bytes) or len(ids) % 4:
        raise ProtocolError("bad-shape", "metrics ids/values must be binary")
    n = len(ids) // 4
    if len(values) != 8 * n:
        raise ProtocolError("bad-shape", f"{n} ids but {len(values) // 8} values")
    if isinstance(steps, bytes):
        if len(steps) != 8 * n:
            raise ProtocolError("bad-shape", "steps length differs from ids")
    elif not isinstance(steps, list) or len(steps) != n:
        raise ProtocolError("bad-shape", "steps must be binary or a list as long as ids")
    if times is not None and (not isinstance(times, list) or len(times) != n):
        raise ProtocolError("bad-shape", "times must be a list as long as ids")
    if not isinstance(texts, list) or not all(isinstance(t, list) and len(t) == 4 for t in texts):
        raise ProtocolError("bad-shape", "texts must be [id, text, step, time] rows")
    return MetricsBatch(keys, ids, values, steps, times, texts)
