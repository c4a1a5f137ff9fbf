"""The TUI's data layer on real files: bucketing, cached reading across merges, ranks, params, log tail."""

from __future__ import annotations

import numpy as np
import pytest
from _tui_runs import T0, make_run, metrics_table, write_part

from expman._storage.layout import list_parts, metrics_schema, part_name
from expman.collector._parts import write_part as write_merged_part
from expman._storage.buckets import aggregate, bucket_width, combine
from expman.tui.data.runs import LogTail, params_diff, rank_rows
from expman.tui.data.series import MetricsSource
from expman.tui.fuzzy import filter_keys
from expman.tui.widgets.braille import Line, render


def naive(x, v, r, width):
    out = {}
    for xi, vi, ri in zip(x, v, r):
        if not (np.isfinite(xi) and np.isfinite(vi)):
            continue
        k = (int(ri), int(np.floor(xi / width)))
        lo, hi, s, n = out.get(k, (np.inf, -np.inf, 0.0, 0))
        out[k] = (min(lo, vi), max(hi, vi), s + vi, n + 1)
    return out


@pytest.mark.parametrize("ranks,shuffle", [(1, False), (1, True), (3, False), (3, True)])
def test_buckets_match_a_plain_loop_and_keep_spikes(ranks, shuffle):
    rng = np.random.default_rng(ranks)
    n = 5000
    x = np.repeat(np.arange(n // ranks), ranks).astype(float)[: n]
    r = np.tile(np.arange(ranks), n)[: len(x)].astype(np.int32)
    v = rng.normal(size=len(x))
    v[1234] = 1e6  # one spike
    v[10] = np.nan
    if shuffle:
        order = rng.permutation(len(x))
        x, v, r = x[order], v[order], r[order]
    width = bucket_width(x.max() - x.min(), 64)
    got = aggregate(x, v, r, width)
    want = naive(x, v, r, width)
    assert len(got) == len(want)
    for i in range(len(got)):
        lo, hi, s, n_ = want[(int(got.rank[i]), int(got.bucket[i]))]
        assert (got.lo[i], got.hi[i], got.count[i]) == (lo, hi, n_)
        assert got.total[i] == pytest.approx(s)
    assert got.hi.max() == 1e6
    # Halving bucket numbers gives the same as bucketing at twice the width.
    coarse = got.coarser(width * 4)
    direct = aggregate(x, v, r, width * 4)
    assert np.array_equal(coarse.bucket, direct.bucket) and np.array_equal(coarse.hi, direct.hi)
    halves = combine([aggregate(x[:999], v[:999], r[:999], width), aggregate(x[999:], v[999:], r[999:], width)], width)
    assert np.array_equal(halves.lo, got.lo) and np.array_equal(halves.count, got.count)


def test_a_spike_survives_rendering():
    x = np.arange(10_000.0)
    y = np.zeros_like(x)
    y[7777] = 100.0
    b = aggregate(x, y, np.zeros(len(x), np.int32), bucket_width(x[-1], 160))
    centre = (b.bucket + 0.5) * b.width
    rows = render([Line("r0", "cyan", centre, b.lo, b.hi, b.mean)], 90, 12, (0, x[-1]))
    top = "".join(s.text for s in rows[0])
    assert "100" in top and any(0x2800 < ord(ch) <= 0x28FF for ch in top)  # the spike reaches the top row


def test_series_reuses_parts_across_a_merge(tmp_path):
    run = tmp_path / "exp" / "r-1"
    (run / "metrics").mkdir(parents=True)
    pts = [("loss", float(i), i, 0, T0 + i) for i in range(3000)] + [("acc", 1.0, i, 0, T0 + i) for i in range(3000)]
    pts.sort(key=lambda p: p[2])
    chunks = [pts[i:i + 1000] for i in range(0, 6000, 1000)]
    for seg, chunk in enumerate(chunks[:4]):
        write_part(run, metrics_table(chunk), 0, seg, seg)
    source = MetricsSource(run)
    source.refresh()
    first = source.series(["loss"], target=64)["loss"]
    assert source.reads == 4 and first.points == 2000 and first.last_x == 1999
    # The collector merges the four parts (with its own code) and writes two more; one is merged away unseen.
    for seg, chunk in enumerate(chunks[4:], start=4):
        write_part(run, metrics_table(chunk), 0, seg, seg)
    parts = list_parts(run / "metrics")
    write_merged_part(parts, run / "metrics" / part_name(1, 0, 5, "test-host"), metrics_schema())
    for p in parts:
        p.path.unlink()
    assert source.refresh()
    merged = source.series(["loss"], target=64)["loss"]
    assert merged.points == 3000 and merged.last_value == 2999.0
    assert source.reads == 5  # only the row groups of the two unseen parts were read
    fresh = MetricsSource(run)
    fresh.refresh()
    again = fresh.series(["loss"], target=64)["loss"]
    assert np.array_equal(again.buckets.hi, merged.buckets.hi) and again.points == merged.points
    assert fresh.keys() == ["acc", "loss"]


def test_rank_rows_flag_the_straggler(tmp_path):
    from expman._storage.layout import read_yaml

    run = make_run(tmp_path, "e", "r", "cc000001", ranks=4, slow_rank=2, status="running", steps=100)
    rows = rank_rows(read_yaml(run / "run.yaml"), now=T0 + 10_000)
    assert [r.straggler for r in rows] == [True, True, True, True]  # silent for hours: all flagged
    rows = rank_rows(read_yaml(run / "run.yaml"), now=T0 + 3600)
    assert [(r.rank, r.lag_steps, r.straggler) for r in rows] == [(0, 0, False), (1, 0, False), (2, 20, True), (3, 0, False)]


def test_params_diff_and_fuzzy_keys():
    rows = params_diff([{"lr": 1, "opt": {"name": "adam"}, "same": 1}, {"lr": 2, "opt": {"name": "sgd"}, "same": 1}])
    assert rows == [("lr", [1, 2]), ("opt.name", ["adam", "sgd"])]
    assert params_diff([{"a": 1}, {}]) == [("a", [1, None])]
    keys = ["train/loss", "val/loss", "lr", "grad_norm/layer1", "accuracy"]
    assert filter_keys("loss", keys)[:2] == ["val/loss", "train/loss"]
    assert filter_keys("gnl", keys) == ["grad_norm/layer1"]
    assert filter_keys("", keys) == keys


def test_log_tail_follows_appends(tmp_path):
    path = tmp_path / "run.log"
    path.write_text("a\nb\npartial")
    tail = LogTail(path)
    assert tail.read_new() == ["a", "b"]
    with open(path, "a") as fh:
        fh.write(" line\nc\n")
    assert tail.read_new() == ["partial line", "c"]
    assert tail.read_new() == []


def test_series_reuses_key_indexed_parts_across_a_merge(tmp_path, monkeypatch):
    """Parts as the collector writes them now: sorted by key with a key index, merged key by
    key. A merged part is assembled from the parts held plus each key's rows past them."""
    from expman.collector._parts import merge_parts

    run = tmp_path / "exp" / "r-2"
    (run / "metrics").mkdir(parents=True)
    pts = [("loss", float(i), i, i % 2, T0 + i) for i in range(3000)] + [("acc", 1.0, i, 0, T0 + i) for i in range(3000)]
    pts += [("loss", None, i, 0, T0 + i) for i in range(0, 3000, 250)]  # text points of the same key: rows, not points
    pts.sort(key=lambda p: p[2])
    chunks = [pts[i:i + 1000] for i in range(0, len(pts), 1000)]

    def flush(seg):
        path = run / "metrics" / part_name(0, seg, seg, "test-host")
        write_merged_part(metrics_table(chunks[seg]), path, metrics_schema(), by_key=True)

    for seg in range(4):
        flush(seg)
    source = MetricsSource(run)
    source.refresh()
    first = source.series(["loss", "acc"], target=64)["loss"]
    assert source.reads == 4 and first.points == sum(1 for p in pts[:4000] if p[0] == "loss" and p[1] is not None)
    held = dict(source._key_rows)
    for seg in range(4, len(chunks)):
        flush(seg)
    merge_parts(list_parts(run / "metrics"), 1, metrics_schema(), by_key=True)
    from expman.tui.data import series as series_module

    skips = []
    real_read_keys = series_module.read_keys
    monkeypatch.setattr(series_module, "read_keys", lambda f, k, c, skip: skips.append(skip) or real_read_keys(f, k, c, skip))
    assert source.refresh()
    merged = source.series(["loss", "acc"], target=64)
    assert merged["loss"].points == 3000 and merged["loss"].last_value == 2999.0 and merged["acc"].points == 3000
    assert source.reads == 5  # the merged part, once: each key's rows past the four parts held
    (name,) = {n for n, _k in source._key_rows}
    assert source._key_rows[(name, "loss")] == sum(1 for p in pts if p[0] == "loss")
    assert all(rows > 0 for rows in held.values()) and len(held) == 8
    assert skips == [{k: sum(rows for (_n, key), rows in held.items() if key == k) for k in ("loss", "acc")}]
    fresh = MetricsSource(run)
    fresh.refresh()
    again = fresh.series(["loss", "acc"], target=64)
    for key in ("loss", "acc"):
        assert np.array_equal(again[key].buckets.hi, merged[key].buckets.hi)
        assert np.array_equal(again[key].buckets.count, merged[key].buckets.count)
    assert fresh.keys() == ["acc", "loss"]
