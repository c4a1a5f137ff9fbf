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


def _check_part(path, want: pa.Table) -> None:
    """The part holds `want`'s rows stably sorted by key, with the key index a reader uses."""
    import pyarrow.parquet as pq

    from expman._storage.key_index import read_index, sort_by_key

    want, want_index = sort_by_key(want)
    file = pq.ParquetFile(path)
    assert read_index(file) == want_index
    got = file.read()
    for name in want.column_names:
        assert got.column(name).cast(want.schema.field(name).type).to_pylist() == want.column(name).to_pylist(), name


@pytest.mark.parametrize("interleaved", [False, True])
def test_a_part_is_written_in_key_order_a_row_group_at_a_time(tmp_path, monkeypatch, interleaved):
    from expman.collector import _metrics_store, _parts

    monkeypatch.setattr(_metrics_store, "ROW_GROUP", 4)  # row groups cut through frames and keys
    if interleaved:  # keys mixed within frames: rows gathered into key order
        frames = [_frame({0: "loss", 1: "acc"}, [1, 0, 1], [6, 6, 7], rank=3, host="other"),
                  _frame({7: "lr", 2: "loss"}, [2, 7, 7, 2, 2], [8, 8, 9, 9, 10], sent_at=1_700_000_001.5),
                  _frame({}, [], []), _frame({0: "b", 1: "a"}, [0, 1, 0, 1, 1], [1, 2, 3, 4, 5])]
    else:  # one key per frame, in key order already: written from the frames' buffers
        frames = [_frame({0: "a"}, [0] * 3, [1, 2, 3]), _frame({0: "a"}, [0] * 6, list(range(4, 10)), rank=1),
                  _frame({}, [], []), _frame({5: "b"}, [5] * 5, list(range(5)), host="other", sent_at=1_700_000_002.0)]
    items = [_small(f)[0] for f in frames]
    rows = _metrics_store._keyed_rows(list(items))
    path = tmp_path / "part.parquet"
    assert _parts.write_part(rows, path, _metrics_store._SCHEMA, by_key=True) == sum(i.num_rows for i in items)
    n = sum(i.num_rows for i in items)
    assert pq_groups(path) == [4] * (n // 4) + [n % 4] * (n % 4 > 0)
    _check_part(path, pa.concat_tables([frame_table(f) for f in frames]))


def pq_groups(path) -> list[int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_a_store_writes_small_and_general_frames_as_one_sorted_part(tmp_path):
    from expman._storage.layout import list_parts
    from expman.collector._metrics_store import MetricsStore

    frames = [_frame({0: "loss", 1: "acc"}, [1, 0, 1], [6, 6, 7]), _frame({0: "loss"}, [0], [9], texts=[[0, "a note", 9, None]])]
    for general in (False, True):
        store = MetricsStore(tmp_path / str(general), "w")
        for f in frames[:1 + general]:
            store.add_frame(proto.encode_frame(proto.METRICS, run="r1", host=f.host, rank=f.rank, sender="s",
                                               seq=f.seq, sent_at=f.sent_at, body=f.body), f)
        store.flush()
        (part,) = list_parts(store.metrics_dir, "w")
        _check_part(part.path, pa.concat_tables([frame_table(f) for f in frames[:1 + general]]))
        store.close()
