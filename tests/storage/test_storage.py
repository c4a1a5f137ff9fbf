"""The run directory as other tools see it, and the write-ahead log and parts underneath."""

from __future__ import annotations

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq

import expman
from expman._wire import columns
from expman._wire import frames as proto
from expman._storage.rows import frame_table
from expman._storage.layout import WAL_DIR, list_parts, part_name
from expman._storage.files import LocalFiles
from expman._storage.wal import SegmentWriter, read_records, segment_path
from expman.collector._metrics_store import MetricsStore
from expman.collector._parts import MERGE_FANIN


def metrics_frame(seq: int, n: int, key: str = "loss") -> bytes:
    from array import array

    body = columns.metrics_body({0: key}, array("i", [0] * n).tobytes(), array("d", [float(seq)] * n).tobytes(),
                              array("q", range(seq * n, seq * n + n)).tobytes(), None, None)
    return proto.encode_frame("metrics", run="r", host="h", rank=2, sender="s", seq=seq, sent_at=1.0, body=body)


def add(store: MetricsStore, raw: bytes) -> None:
    frame = proto.decode_frame(raw)
    store.add(raw, frame_table(frame), frame.sender, frame.seq)


def test_run_is_readable_by_pyarrow_duckdb_and_polars_without_expman(root):
    with expman.start_experiment("vision", "resnet", root=root) as exp:
        for step in range(300):
            exp.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 300}, step=step)
        exp.log_metric("phase", "done", step=300)
    pattern = str(exp.run_dir / "metrics" / "*.parquet")
    table = ds.dataset(str(exp.run_dir / "metrics"), format="parquet").to_table()
    assert table.num_rows == 601
    (rows,) = duckdb.sql(f"select count(*) from read_parquet('{pattern}') where key = 'loss'").fetchall()[0]
    assert rows == 300
    (last,) = duckdb.sql(f"select value from read_parquet('{pattern}') where key = 'loss' order by step desc limit 1").fetchall()[0]
    assert last == 1.0 / 300
    frame = pl.read_parquet(pattern)
    assert frame.filter(pl.col("key") == "acc").height == 300
    assert frame.filter(pl.col("key") == "phase")["text"].to_list() == ["done"]
    # Whole experiments too: a glob over every run.
    (runs,) = duckdb.sql(f"select count(distinct rank) from read_parquet('{root}/*/*/metrics/*.parquet')").fetchall()[0]
    assert runs == 1


def test_parts_stay_bounded_and_compact_to_one(tmp_path):
    store = MetricsStore(tmp_path, "node1")
    for seq in range(40):
        add(store, metrics_frame(seq, 10))
        store.flush()
        assert len(list_parts(tmp_path / "metrics")) < 2 * MERGE_FANIN
    store.compact()
    parts = list_parts(tmp_path / "metrics")
    assert len(parts) == 1
    table = pq.read_table(parts[0].path)
    assert sorted(table["step"].to_pylist()) == list(range(400))
    assert set(table["rank"].to_pylist()) == {2}
    store.close()
    assert not (tmp_path / ".wal").exists()


def test_restart_recovers_unflushed_wal_and_ignores_what_parts_hold(tmp_path):
    store = MetricsStore(tmp_path, "node1")
    add(store, metrics_frame(0, 5))
    store.flush()                                # in a part
    add(store, metrics_frame(1, 5))
    add(store, metrics_frame(2, 5))
    store.sync()                                 # only in the WAL: the collector "crashes" here
    again = MetricsStore(tmp_path, "node1")
    steps = sorted(s for p in list_parts(tmp_path / "metrics") for s in pq.read_table(p.path)["step"].to_pylist())
    assert steps == list(range(15))
    add(again, metrics_frame(3, 5))
    again.compact()
    (part,) = list_parts(tmp_path / "metrics")
    assert sorted(pq.read_table(part.path)["step"].to_pylist()) == list(range(20))


def test_interrupted_merge_never_counts_a_point_twice(tmp_path):
    store = MetricsStore(tmp_path, "node1")
    for seq in range(3):
        add(store, metrics_frame(seq, 4))
        store.flush()
    metrics = tmp_path / "metrics"
    parts = list_parts(metrics)
    # A merge that wrote its output but died before deleting its inputs.
    merged = metrics / part_name(1, parts[0].first, parts[-1].last, "node1")
    pq.write_table(pq.ParquetDataset([str(p.path) for p in parts]).read(), merged)
    run_dir = tmp_path
    (run_dir / "run.yaml").write_text("id: r\nstatus: running\n")
    assert expman.open_run(run_dir).metrics().num_rows == 12  # the reader skips covered parts
    MetricsStore(tmp_path, "node1")                                      # the collector deletes them
    assert [p.path for p in list_parts(metrics)] == [merged]
    assert len(list(metrics.glob("*.parquet"))) == 1


def test_torn_wal_tail_is_recovered_up_to_the_last_whole_record(tmp_path):
    writer = SegmentWriter(tmp_path, 0)
    records = [metrics_frame(i, 3) for i in range(4)]
    for r in records:
        writer.append(r)
    writer.close()
    path = segment_path(tmp_path, 0)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # power loss mid-record
    assert list(read_records(path)) == records[:3]
    corrupted = bytearray(data)
    corrupted[20] ^= 0xFF        # a flipped bit in the first record
    path.write_bytes(bytes(corrupted))
    assert list(read_records(path)) == []


def test_sequence_window_drops_duplicates_and_stays_small():
    from expman.collector._server import SeqWindow

    w = SeqWindow()
    for seq in (0, 2, 1, 5):
        assert not w.seen(seq)
        w.add(seq)
    assert all(w.seen(s) for s in (0, 1, 2, 5)) and not w.seen(3) and not w.seen(4)
    assert w.floor == 3 and w.ranges == [[5, 5]]
    # After a restart the early numbers are never seen; `low` from the sender moves the floor.
    fresh = SeqWindow()
    for seq in range(1000, 1100):
        fresh.raise_floor(seq - 2)
        fresh.add(seq)
    assert fresh.ranges == [] and fresh.floor == 1100


def test_a_turns_seqs_marked_at_once_are_the_same_as_one_by_one():
    """The delivery record marks a turn's seqs in one go (collector/_delivery.py)."""
    import random

    from expman.collector._server import SeqWindow

    rng = random.Random(7)
    for _ in range(200):
        one, many = SeqWindow(), SeqWindow()
        for w in (one, many):
            w.raise_floor(3)
            w.add_range(10, 12)
        seqs = rng.sample(range(40), rng.randint(1, 30))
        for seq in seqs:
            one.add(seq)
        many.add_many(seqs)
        assert (many.floor, many.ranges) == (one.floor, one.ranges), seqs


def test_a_restarted_store_knows_every_frame_it_holds(tmp_path):
    """Parts record which frames they hold, so a collector restarted after a WAL segment was
    folded into a part still recognises a resend of one of those frames."""
    store = MetricsStore(tmp_path, "node1")
    for seq in range(3):
        add(store, metrics_frame(seq, 4))
        store.flush()                         # frames 0-2 in parts, their WAL segments gone
    add(store, metrics_frame(3, 4))
    store.sync()                              # frame 3 only in the WAL: the collector "crashes"
    again = MetricsStore(tmp_path, "node1")
    assert again.stored_frames == {"s": [[0, 3]]}
    from expman.collector._server import SeqWindow

    window = SeqWindow()
    window.add_range(5, 9)
    for lo, hi in again.stored_frames["s"]:
        window.add_range(lo, hi)
    assert window.floor == 4 and window.ranges == [[5, 9]] and window.seen(2) and not window.seen(4)


class FlushWhileListing(LocalFiles):
    """The local disk, with the collector's flush landing at the worst moment for a reader:
    after it has listed the parts, before it lists the write-ahead segments."""

    def __init__(self, store: MetricsStore) -> None:
        self.store, self.flushed = store, False

    def dirs(self, path):
        if path.name == WAL_DIR and not self.flushed:
            self.flushed = True
            self.store.flush()  # the WAL's rows become a new part; their segments are deleted
        return super().dirs(path)


def test_a_flush_between_the_readers_listings_hides_no_point(tmp_path):
    store = MetricsStore(tmp_path, "node1")
    add(store, metrics_frame(0, 5))
    store.flush()                                # in a part
    add(store, metrics_frame(1, 5))
    add(store, metrics_frame(2, 5))
    store.sync()                                 # acknowledged: in the WAL only, for now
    run = expman.Run._found(FlushWhileListing(store), tmp_path)
    assert sorted(run.metrics()["step"].to_pylist()) == list(range(15))
