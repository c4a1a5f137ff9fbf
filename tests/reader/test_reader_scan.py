"""Reads that take only what is asked: filtered and reduced reads equal a full read filtered
afterwards, on runs the collector's own store wrote (several parts, a merge, a live
write-ahead tail), and the lazy form streams the same rows."""

from __future__ import annotations

from array import array

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import numpy as np
import pytest

import expman
from expman._storage.key_index import read_index
from expman._storage.layout import list_parts
from expman._storage.rows import frame_table
from expman._wire import columns
from expman._wire import frames as proto
from expman.collector._metrics_store import MetricsStore

KEYS = ["loss", "acc", "grad/norm", "lr"]


def frame(seq: int, rank: int, steps: range, host: str = "h0", text: bool = False) -> bytes:
    """One rank's points for `steps`: every key at every step (some keys skip odd steps)."""
    ids, values, step_col = array("i"), array("d"), array("q")
    for step in steps:
        for i, key in enumerate(KEYS):
            if key == "lr" and step % 2:
                continue
            ids.append(i)
            values.append(step * (i + 1) + rank / 10 + (float("nan") if step == 7 and key == "acc" else 0.0))
            step_col.append(step)
    texts = [[0, f"note {seq}", steps[0], None]] if text else None
    body = columns.metrics_body(dict(enumerate(KEYS)), ids.tobytes(), values.tobytes(), step_col.tobytes(), None, texts)
    return proto.encode_frame("metrics", run="r", host=host, rank=rank, sender=f"s{rank}", seq=seq,
                              sent_at=1_700_000_000.0 + seq, body=body)


def write_run(run_dir, flushes: int = 12, ranks: int = 3, tail: bool = True) -> None:
    """Points of `ranks` ranks, flushed `flushes` times (the store merges every 8 parts), and,
    with `tail`, more points left in the write-ahead log only, as a live run has."""
    (run_dir / "run.yaml").write_text("id: r\nname: x\nstatus: running\n")
    store = MetricsStore(run_dir, "node1")
    seq = 0
    for f in range(flushes + (1 if tail else 0)):
        for rank in range(ranks):
            raw = frame(seq, rank, range(f * 20, f * 20 + 20), host=f"h{rank % 2}", text=(f + rank) % 4 == 0)
            decoded = proto.decode_frame(raw)
            store.add(raw, frame_table(decoded), decoded.sender, decoded.seq)
            seq += 1
        store.sync()
        if f < flushes:
            store.flush()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("scan") / "exp" / "x-r"
    run_dir.mkdir(parents=True)
    write_run(run_dir)
    return expman.open_run(run_dir)


def plain(table: pa.Table) -> list[dict]:
    if pa.types.is_dictionary(table.schema.field("key").type):
        table = table.set_column(0, "key", table["key"].cast(pa.string()))
    if "host" in table.column_names and pa.types.is_dictionary(table.schema.field("host").type):
        i = table.schema.get_field_index("host")
        table = table.set_column(i, "host", table["host"].cast(pa.string()))
    rows = table.to_pylist()
    for row in rows:
        if row.get("value") != row.get("value"):
            row["value"] = "NaN"  # NaN != NaN; the rows are still equal
    return rows


def test_the_run_has_merged_and_fresh_parts_indexed_by_key_and_a_tail(run):
    parts = list_parts(run.path / "metrics")
    assert sorted(p.level for p in parts) == [0, 0, 0, 0, 1]
    for part in parts:
        file = pq.ParquetFile(part.path)
        index = read_index(file)
        keys = file.read(columns=["key"])["key"].cast(pa.string()).to_pylist()
        assert list(index) == sorted(set(keys)) and keys == sorted(keys)  # rows sorted by key, index matches
    assert list((run.path / ".wal" / "node1").glob("*.wal"))
    everything = run.metrics()
    texts = sum((f + rank) % 4 == 0 for f in range(13) for rank in range(3))
    assert everything.num_rows == 13 * 3 * (20 * 3 + 10) + texts  # 12 flushes and the tail, 3 ranks
    assert pc.sum(pc.is_valid(everything["text"])).as_py() == texts
    # each key keeps its arrival order: per rank, steps only go up
    everything = everything.filter(pc.is_valid(everything["value"]))
    for key in KEYS:
        for rank in range(3):
            steps = everything.filter(pc.and_(pc.equal(everything["key"].cast(pa.string()), key),
                                              pc.equal(everything["rank"], rank)))["step"].to_pylist()
            assert steps == sorted(steps) and len(steps) >= 13 * 10


@pytest.mark.parametrize("keys, ranks, steps", [
    (["loss"], None, None),
    (["lr", "acc"], None, None),
    ("grad/norm", [0, 2], None),
    (None, 1, None),
    (None, None, (35, 170)),
    (["loss", "nope"], [2], (None, 99)),
    (None, None, range(200, 261)),
    (["acc"], [5], None),
])
def test_a_filtered_read_equals_a_full_read_filtered_afterwards(run, keys, ranks, steps):
    full = run.metrics()
    mask = pc.is_valid(full["rank"])
    if keys is not None:
        wanted = [keys] if isinstance(keys, str) else keys
        mask = pc.and_(mask, pc.is_in(full["key"].cast(pa.string()), pa.array(wanted)))
    if ranks is not None:
        mask = pc.and_(mask, pc.is_in(full["rank"], pa.array([ranks] if isinstance(ranks, int) else ranks, pa.int32())))
    if steps is not None:
        lo, hi = (steps.start, steps.stop - 1) if isinstance(steps, range) else steps
        mask = pc.and_kleene(mask, pc.is_valid(full["step"]))
        if lo is not None:
            mask = pc.and_kleene(mask, pc.greater_equal(full["step"], lo))
        if hi is not None:
            mask = pc.and_kleene(mask, pc.less_equal(full["step"], hi))
    got = run.metrics(keys, ranks, steps=steps)
    assert got.schema == full.schema
    assert plain(got) == plain(full.filter(mask))


@pytest.mark.parametrize("how", ["mean", "min", "max", "median"])
@pytest.mark.parametrize("keys", [None, ["loss", "lr"]])
@pytest.mark.parametrize("batch_rows", [None, 50])
def test_reduce_equals_a_group_by_of_the_full_read(run, how, keys, batch_rows, monkeypatch):
    if batch_rows is not None:  # a key or a few at a time, as for runs bigger than this one
        monkeypatch.setattr("expman._reader.reduce.BATCH_ROWS", batch_rows)
    full = run.metrics()
    numeric = full.filter(pc.is_valid(full["value"]))
    numeric = numeric.set_column(0, "key", numeric["key"].cast(pa.string()))
    if keys is not None:
        numeric = numeric.filter(pc.is_in(numeric["key"], pa.array(keys)))
    agg = {"median": "list"}.get(how, how)
    want = numeric.group_by(["key", "step"]).aggregate([("value", agg), ("rank", "count_distinct"), ("time", "max")])
    if how == "median":  # exact, NaN left out
        medians = [float(np.median([v for v in vs if v == v])) if any(v == v for v in vs) else float("nan")
                   for vs in want["value_list"].to_pylist()]
        want = want.append_column("value_median", pa.array(medians))
    want = want.sort_by([("key", "ascending"), ("step", "ascending")])
    got = run.metrics(keys, reduce=how)
    assert got.column_names == ["key", "step", "value", "ranks", "time"]
    assert got["key"].to_pylist() == want["key"].to_pylist() and got["step"].to_pylist() == want["step"].to_pylist()
    assert got["ranks"].to_pylist() == want["rank_count_distinct"].to_pylist()
    assert got["time"].to_pylist() == want["time_max"].to_pylist()
    values, expected = got["value"].to_pylist(), want[f"value_{how}" if how == "median" else f"value_{agg}"].to_pylist()
    assert len(values) == len(expected)
    for v, e in zip(values, expected):
        assert (v != v and e != e) or v == pytest.approx(e)
    some = run.metrics("loss", ranks=[0, 1], steps=(10, 20), reduce="max")
    assert some["step"].to_pylist() == list(range(10, 21)) and set(some["ranks"].to_pylist()) == {2}


def test_columns_and_the_lazy_form(run):
    slim = run.metrics("acc", columns=["step", "value"])
    assert slim.column_names == ["value", "step"]
    reader = run.iter_metrics(["loss", "acc"], ranks=[1])
    batches = list(reader)
    assert all(b.num_rows <= 131_072 for b in batches) and len(batches) > 1
    streamed = pa.Table.from_batches(batches)
    assert plain(streamed) == plain(run.metrics(["loss", "acc"], ranks=[1]))
    # DuckDB scans the stream as it comes
    import duckdb

    stream = run.iter_metrics("loss")
    (rows, mean) = duckdb.sql("select count(*), avg(value) from stream").fetchall()[0]
    loss = run.metrics("loss")
    assert rows == loss.num_rows and mean == pytest.approx(pc.mean(loss["value"]).as_py())


def test_bad_arguments_say_what_is_wrong(run):
    with pytest.raises(ValueError, match="reduce must be one of"):
        run.metrics(reduce="sum")
    with pytest.raises(ValueError, match="unknown metrics columns"):
        run.metrics(columns=["loss"])
    with pytest.raises(TypeError, match="steps must be"):
        run.metrics(steps=5)
    with pytest.raises(TypeError, match="ranks must be"):
        run.metrics(ranks=["0"])


def test_parts_from_before_the_key_index_still_read(tmp_path):
    """A run written by an older collector: parts in arrival order, no index."""
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    write_run(run_dir, flushes=3, tail=False)
    for part in list_parts(run_dir / "metrics"):
        table = pq.read_table(part.path).sort_by([("rank", "descending")])  # any order, no key index
        pq.write_table(table, part.path, row_group_size=50)
    run = expman.open_run(run_dir)
    assert all(read_index(pq.ParquetFile(p.path)) is None for p in list_parts(run_dir / "metrics"))
    full = run.metrics()
    got = run.metrics(["acc", "lr"], ranks=[0, 2], steps=(5, 44))
    mask = pc.and_(pc.is_in(full["key"].cast(pa.string()), pa.array(["acc", "lr"])),
                   pc.is_in(full["rank"], pa.array([0, 2], pa.int32())))
    mask = pc.and_(mask, pc.and_(pc.greater_equal(full["step"], 5), pc.less_equal(full["step"], 44)))
    assert plain(got) == plain(full.filter(mask)) and got.num_rows > 0


def test_a_run_of_many_keys_reads_whole_row_groups(tmp_path):
    """20,000 keys, each a few rows: row groups hold thousands of keys. Every point comes back
    once with its key, a scattered subset of keys equals the full read filtered, and the
    lazy form gives a batch per row group, not one per key (each batch holds the key
    dictionary so far, so a batch per key took memory quadratic in the keys)."""
    run_dir = tmp_path / "exp" / "wide"
    run_dir.mkdir(parents=True)
    (run_dir / "run.yaml").write_text("id: w\nname: wide\nstatus: running\n")
    names = {i: f"layer{i:05d}/norm" for i in range(20_000)}
    store = MetricsStore(run_dir, "node1")
    for seq, step in enumerate(range(3)):
        ids = array("i", names)
        body = columns.metrics_body(names, ids.tobytes(), array("d", (i + step / 10 for i in names)).tobytes(),
                                    array("q", [step] * len(names)).tobytes(), None, None)
        raw = proto.encode_frame("metrics", run="w", host="h0", rank=0, sender="s0", seq=seq,
                                 sent_at=1_700_000_000.0 + seq, body=body)
        decoded = proto.decode_frame(raw)
        store.add(raw, frame_table(decoded), decoded.sender, decoded.seq)
        store.sync()
        store.flush()
    run = expman.open_run(run_dir)
    full = run.metrics()
    got = sorted(zip(full["key"].cast(pa.string()).to_pylist(), full["step"].to_pylist(), full["value"].to_pylist()))
    assert got == sorted((names[i], step, i + step / 10) for i in names for step in range(3))
    wanted = [names[i] for i in (3, 4, 777, 12_345, 19_999)]
    subset = run.metrics(wanted)
    assert plain(subset) == plain(full.filter(pc.is_in(full["key"].cast(pa.string()), pa.array(wanted))))
    groups = sum(pq.ParquetFile(p.path).metadata.num_row_groups for p in list_parts(run_dir / "metrics"))
    assert 1 < groups < 100 and len(list(run.iter_metrics())) <= groups
