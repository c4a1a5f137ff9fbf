"""Plain metrics frames kept as raw columns until their part (collector/_metrics_store.py)
give exactly the rows the general path gives, and are refused for the same faults."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from expman.collector._metrics_store import _pending_table, _small
from expman._errors import ProtocolError
from expman._storage.rows import frame_table
from expman._wire import frames as proto
from expman._wire.columns import metrics_body


def _frame(keys: dict[int, str], ids: list[int], steps: list[int], *, rank: int = 0, host: str = "h",
           sent_at: float = 1_700_000_000.25, texts: list | None = None, times: list | None = None) -> proto.Frame:
    body = metrics_body(keys, np.array(ids, np.int32).tobytes(), np.arange(len(ids), dtype=np.float64).tobytes(),
                        np.array(steps, np.int64).tobytes(), times, texts)
    data = proto.encode_frame(proto.METRICS, run="r1", host=host, rank=rank, sender="s", seq=1,
                              sent_at=sent_at, body=body)
    return proto.decode_frame(data, proto.MAX_FRAME_BYTES)


def test_small_frames_give_the_rows_of_the_general_path():
    frames = [
        _frame({0: "loss"}, [0], [5]),
        _frame({0: "loss", 1: "acc"}, [1, 0, 1], [6, 6, 7], rank=3, host="other"),
        _frame({7: "lr", 2: "loss"}, [2, 7], [8, 8], sent_at=1_700_000_001.5),  # ids not 0..n-1
        _frame({0: "loss"}, [0], [9], texts=[[0, "a note", 9, None]]),  # general path in between
        _frame({}, [], []),
    ]
    items, lasts = zip(*(_small(f) for f in frames))
    assert lasts == (5, 7, 8, 9, None)
    assert sum(isinstance(i, pa.Table) for i in items) == 1
    got = _pending_table(list(items))
    want = pa.concat_tables([frame_table(f) for f in frames])
    assert got.schema == want.schema
    for name in want.column_names:  # dictionaries may be numbered differently: compare what they mean
        assert got.column(name).cast(want.schema.field(name).type).to_pylist() == want.column(name).to_pylist(), name


@pytest.mark.parametrize("keys, ids", [
    ({0: "loss"}, [1]),  # an id the frame does not define
    ({0: "loss"}, [-1]),
    ({3: "loss", 5: "acc"}, [4]),
    ({-1: "loss"}, [0]),  # a negative id: the general path refuses it
    ({2**30: "loss"}, [0]),  # a huge id: no huge lookup table
])
def test_small_frames_refuse_what_the_general_path_refuses(keys, ids):
    frame = _frame(keys, ids, [0] * len(ids))
    with pytest.raises(ProtocolError):
        frame_table(frame)
    with pytest.raises(ProtocolError):
        _small(frame)
