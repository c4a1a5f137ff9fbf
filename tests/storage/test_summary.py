"""Chart summaries in merged parts: exact against the points, foldable across merges, written
by a real collector, and used by expman-tui so a big run opens without reading its points."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from _tui_runs import T0, metrics_table

import expman
from expman._storage import summary as _summary
from expman._storage.buckets import aggregate, bucket_width
from expman._storage.layout import list_parts
from expman.tui.data.runs import LatestValues
from expman.tui.data.series import MetricsSource
from _helpers import wait_for
from conftest import start_collector


def messy_table(seed: int, n: int = 20_000) -> pa.Table:
    """Several keys and ranks, out-of-order and missing steps, NaN/inf values, text-only points."""
    rng = np.random.default_rng(seed)
    keys = ["loss", "acc", "lr", "note"]
    key = rng.choice(4, n, p=[0.5, 0.3, 0.15, 0.05])
    step = np.arange(n) // 3 + rng.integers(-5, 5, n)  # mostly increasing, some negative at the start
    value = rng.normal(size=n)
    value[rng.random(n) < 0.01] = np.nan
    value[rng.random(n) < 0.005] = np.inf
    rows = []
    for i in range(n):
        text_point = keys[key[i]] == "note"
        rows.append((keys[key[i]], None if text_point else float(value[i]),
                     None if rng.random() < 0.01 else int(step[i]), int(rng.integers(0, 3)), T0 + i))
    return metrics_table(rows)


def raw_points(table: pa.Table, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [r for r in table.to_pylist() if r["key"] == key and r["value"] is not None]
    step = np.array([math.nan if r["step"] is None else r["step"] for r in rows], float)
    return step, np.array([r["value"] for r in rows], float), np.array([r["rank"] for r in rows], np.int32)


def assert_same_buckets(got, want):
    assert got.width == want.width
    for field in ("rank", "bucket", "lo", "hi", "count"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    assert np.allclose(got.total, want.total)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_summary_is_exact_for_every_key_and_rank(seed):
    table = messy_table(seed)
    summary = _summary.summarize(table)
    assert set(summary) == {"loss", "acc", "lr", "note"}
    assert summary["note"].points == 0  # text only: listed, nothing to draw
    for key in ("loss", "acc", "lr"):
        step, value, rank = raw_points(table, key)
        ks = summary[key]
        finite_step = step[np.isfinite(step)]
        assert (ks.points, ks.nonfinite) == (len(value), int((~np.isfinite(value)).sum()))
        assert (ks.x_min, ks.x_max) == (finite_step.min(), finite_step.max())
        assert ks.last_value == value[-1] or (math.isnan(ks.last_value) and math.isnan(value[-1]))
        assert ks.last_x == step[-1] or (math.isnan(ks.last_x) and math.isnan(step[-1]))
        assert ks.buckets.width == bucket_width(finite_step.max() - finite_step.min(), _summary.SUMMARY_BUCKETS)
        assert_same_buckets(ks.buckets, aggregate(step, value, rank, ks.buckets.width))
    decoded = _summary.decode(_summary.encode(summary))
    for key, ks in summary.items():
        assert decoded[key].points == ks.points and decoded[key].last_value == pytest.approx(ks.last_value, nan_ok=True)
        assert_same_buckets(decoded[key].buckets, ks.buckets)


def test_summaries_of_pieces_merge_into_the_summary_of_the_whole():
    table = messy_table(3, 30_000)
    whole = _summary.summarize(table)
    merged = _summary.merge([_summary.summarize(table.slice(a, 7_000)) for a in range(0, 30_000, 7_000)])
    assert set(merged) == set(whole)
    for key, ks in whole.items():
        m = merged[key]
        assert (m.points, m.nonfinite, m.x_min, m.x_max) == (ks.points, ks.nonfinite, ks.x_min, ks.x_max)
        assert m.last_value == pytest.approx(ks.last_value, nan_ok=True)
        if ks.points:
            assert_same_buckets(m.buckets, ks.buckets)


def test_a_real_run_opens_from_its_summary_and_matches_the_points(root, short_dir):
    c = start_collector(root, short_dir)
    try:
        with expman.start_experiment("big", "summary", root=root, collector=c.endpoint) as exp:
            for step in range(60_000):
                exp.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 60_000}, step=step)
                if step == 31_337:
                    exp.log_metric("loss", 50.0, step=step)  # a spike the chart must keep
    finally:
        assert c.stop() == 0, c.log()
    run = expman.open_run(exp.run_dir)
    assert run.status == "finished"
    [part] = list_parts(run.path / "metrics")  # one part at finish: a short run's only one, with its summary
    summary = _summary.read_summary(part.path)
    assert summary is not None and set(summary) == {"loss", "acc"}

    source = MetricsSource(run.path)
    source.refresh()
    series = source.series(["loss", "acc"], target=600)
    assert source.reads == 0, "drawn from the footer, no points read"
    assert source.keys() == ["acc", "loss"]
    loss = series["loss"]
    assert loss.points == 60_001 and loss.last_value == pytest.approx(1 / 60_000) and loss.last_x == 59_999
    assert loss.buckets.hi.max() == 50.0
    assert LatestValues(["loss", "acc", "val_loss"]).of(run.path) == {"loss": 1 / 60_000, "acc": 59_999 / 60_000}

    points = run.metrics("loss")
    step = np.array(points["step"].to_pylist(), float)
    value = np.array(points["value"].to_pylist(), float)
    assert_same_buckets(loss.buckets, aggregate(step, value, np.zeros(len(step), np.int32), loss.buckets.width))

    # Finer buckets than the summary holds: the points are read instead, and agree.
    fine = MetricsSource(run.path)
    fine.refresh()
    wide = fine.series(["loss"], target=8 * _summary.SUMMARY_BUCKETS)["loss"]
    assert fine.reads == 1 and wide.points == 60_001
    assert_same_buckets(wide.buckets, aggregate(step, value, np.zeros(len(step), np.int32), wide.buckets.width))
