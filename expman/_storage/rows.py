"""Turn a metrics batch from the wire into rows of the storage schema, without Python loops.

Used by the collector when it persists a frame and by the reader when it replays a
write-ahead segment of a live or crashed run.
"""

from __future__ import annotations

from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from expman._errors import ProtocolError
from expman._wire.columns import MetricsBatch, read_metrics_body
from expman._wire.frames import Frame, decode_frame
from expman._storage.layout import metrics_schema

_SCHEMA = metrics_schema()
_TIME = _SCHEMA.field("time").type


def _column(buffer: bytes, type_: pa.DataType, n: int) -> pa.Array:
    return pa.Array.from_buffers(type_, n, [None, pa.py_buffer(buffer)])


def _times_us(times: list | None, n: int, default: float) -> pa.Array:
    if times is None:  # the common case: every point takes the frame's time
        return pa.repeat(pa.scalar(int(default * 1e6), _TIME), n)
    seconds = pc.fill_null(pa.array(times, pa.float64()), default)
    return pc.cast(pc.multiply(seconds, 1e6), pa.int64(), safe=False).cast(_TIME)


def _key_dictionary(keys: dict[int, str], ids: pa.Array) -> pa.DictionaryArray:
    known = sorted(keys)
    if known == list(range(len(known))):
        indices = ids
    else:
        indices = pc.index_in(ids, value_set=pa.array(known, pa.int32())).cast(pa.int32())
    if len(ids):
        bounds = pc.min_max(indices)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if indices.null_count or lo < 0 or hi >= len(known):
            raise ProtocolError("bad-values", "a point names a key id the frame does not define")
    names = pa.array([keys[i] for i in known], pa.string())
    return pa.DictionaryArray.from_arrays(indices, names)


def batch_table(batch: MetricsBatch, rank: int, host: str, sent_at: float) -> pa.Table:
    """Rows for one batch; raises ProtocolError("bad-values") for values of the wrong type."""
    n = batch.count
    try:
        ids = _column(batch.ids, pa.int32(), n)
        values = _column(batch.values, pa.float64(), n)
        if isinstance(batch.steps, bytes):
            steps = _column(batch.steps, pa.int64(), n)
        else:
            steps = pa.array(batch.steps, pa.int64())
        times = _times_us(batch.times, n, sent_at)
        texts = batch.texts
        if texts:
            ids = pa.concat_arrays([ids, pa.array([t[0] for t in texts], pa.int32())])
            values = pa.concat_arrays([values, pa.nulls(len(texts), pa.float64())])
            steps = pa.concat_arrays([steps, pa.array([t[2] for t in texts], pa.int64())])
            times = pa.concat_arrays([times, _times_us([t[3] for t in texts], len(texts), sent_at)])
            text = pa.concat_arrays([pa.nulls(n, pa.string()), pa.array([t[1] for t in texts], pa.string())])
        else:
            text = pa.nulls(n, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("bad-values", str(exc)) from None
    total = len(ids)
    hosts = pa.DictionaryArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), total), pa.array([host], pa.string()))
    return pa.Table.from_arrays(
        [
            _key_dictionary(batch.keys, ids),
            values,
            text,
            steps,
            pa.repeat(pa.scalar(rank, pa.int32()), total),
            hosts,
            times,
        ],
        schema=_SCHEMA,
    )


def frame_table(frame: Frame) -> pa.Table:
    """Rows of a decoded metrics frame."""
    return batch_table(read_metrics_body(frame.body), frame.rank, frame.host, frame.sent_at)


def wal_table(records: Iterable[bytes]) -> pa.Table | None:
    """Rows of every metrics frame in write-ahead records (None when there are none)."""
    tables = [frame_table(decode_frame(raw)) for raw in records]
    return pa.concat_tables(tables) if tables else None
