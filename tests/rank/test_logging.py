"""Logging through the real local collector and reading the run back."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pytest

import expman
from _helpers import wait_for


def points(run: expman.Run, key: str) -> list[dict]:
    return run.metrics(keys=[key]).to_pylist()


def test_values_steps_and_text_round_trip(root):
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=dt.timezone.utc)
    with expman.start_experiment("mnist", "baseline", root=root) as exp:
        for step in range(100):
            exp.log_metric("loss", 1.0 / (step + 1), step=step)
        exp.log_metric("epoch", 3, step=7)                      # int
        exp.log_metric("flag", True, step=7)                    # bool
        exp.log_metric("np", np.float32(0.25), step=np.int64(8))  # numpy scalar value and step
        exp.log_metric("nan", float("nan"), step=1)
        exp.log_metric("inf", float("-inf"), step=1)
        exp.log_metric("no_step", 2.5)
        exp.log_metric("stamped", 1.0, step=1, timestamp=1_700_000_000.5)
        exp.log_metric("created", 1.0, step=1, created_at=when)
        exp.log_metric("phase", "warmup", step=0)               # text value
        exp.log_metrics({"acc": 0.9, "lr": 1e-3, "note": "ok"}, step=9)
        exp.log_metrics([expman.Metric("m1", 1.5, step=4), expman.Metric("m2", 2)], step=5)

    run = expman.open_run(exp.run_dir)
    assert run.status == "finished"
    loss = points(run, "loss")
    assert [p["step"] for p in loss] == list(range(100))
    assert [p["value"] for p in loss] == [1.0 / (s + 1) for s in range(100)]
    assert all(p["rank"] == 0 and p["text"] is None for p in loss)
    assert points(run, "epoch")[0]["value"] == 3.0
    assert points(run, "flag")[0]["value"] == 1.0
    assert points(run, "np")[0]["value"] == 0.25 and points(run, "np")[0]["step"] == 8
    assert math.isnan(points(run, "nan")[0]["value"])
    assert points(run, "inf")[0]["value"] == float("-inf")
    assert points(run, "no_step")[0]["step"] is None
    assert points(run, "stamped")[0]["time"].timestamp() == 1_700_000_000.5
    assert points(run, "created")[0]["time"] == when
    phase = points(run, "phase")[0]
    assert phase["text"] == "warmup" and phase["value"] is None and phase["step"] == 0
    assert points(run, "note")[0]["text"] == "ok"
    assert points(run, "acc")[0]["step"] == 9
    assert [(p["value"], p["step"]) for p in points(run, "m1")] == [(1.5, 4)]
    assert [(p["value"], p["step"]) for p in points(run, "m2")] == [(2.0, 5)]
    table = run.metrics()
    assert {"key", "value", "step", "rank", "time", "text", "host"} <= set(table.column_names)
    assert table.num_rows == 100 + 14
    assert pa.types.is_dictionary(table.schema.field("key").type)


def test_bad_values_raise_at_the_call_and_keep_earlier_points(root):
    with expman.start_experiment("e", "bad", root=root) as exp:
        exp.log_metric("loss", 0.5, step=1)
        with pytest.raises(TypeError, match="'loss'.*list"):
            exp.log_metric("loss", [1, 2], step=2)
        with pytest.raises(TypeError, match="'loss'.*NoneType"):
            exp.log_metric("loss", None)
        with pytest.raises(TypeError, match="'acc'.*dict"):
            exp.log_metrics({"acc": {"nested": 1}}, step=3)
        with pytest.raises(TypeError, match="step"):
            exp.log_metric("loss", 0.1, step="three")
        with pytest.raises(TypeError, match="metric key"):
            exp.log_metric(42, 0.1)
        with pytest.raises(TypeError, match="timestamp"):
            exp.log_metric("loss", 0.1, timestamp="yesterday")
        with pytest.raises(TypeError, match="'opt'.*object"):
            exp.log_parameter("opt", object())
        with pytest.raises(TypeError, match="parameters must be a dict"):
            exp.log_parameters(["lr", 1])
        with pytest.raises(ValueError, match="log level"):
            exp.log_message("x", level="loud")
        exp.log_metric("loss", 0.25, step=4)
    run = expman.open_run(exp.run_dir)
    assert [(p["step"], p["value"]) for p in points(run, "loss")] == [(1, 0.5), (4, 0.25)]


def test_bad_names_are_refused(root):
    for bad in ("../escape", "a/b", "", "x\x00y"):
        with pytest.raises(ValueError, match="name"):
            expman.start_experiment(bad, root=root)
    with pytest.raises(ValueError, match="name"):
        expman.start_experiment("ok", "../../etc", root=root)


def test_parameters_and_log_lines(root):
    with expman.start_experiment("e", "params", root=root, tags=["baseline", "v1"]) as exp:
        exp.log_parameter("lr", 1e-3)
        exp.log_parameters({"opt": "adam", "layers": [64, 64], "sched": {"kind": "cosine", "warmup": 100},
                            "seed": np.int64(7), "half": True, "none": None})
        exp.log_parameter("lr", 3e-4)  # later values win
        exp.log_message("starting", level="info")
        exp.warn("careful")
        exp.error("bad batch\nsecond line")
    run = expman.open_run(exp.run_dir)
    assert run.params == {"lr": 3e-4, "opt": "adam", "layers": [64, 64],
                          "sched": {"kind": "cosine", "warmup": 100}, "seed": 7, "half": True, "none": None}
    text = run.log_text()
    assert "INFO starting" in text and "WARNING careful" in text and "ERROR bad batch\n    second line" in text
    assert run.info["tags"] == ["baseline", "v1"]


def test_run_yaml_identity_and_status(root):
    with expman.start_experiment("vision", "resnet", root=root) as exp:
        exp.log_metric("loss", 1.0, step=41)
    info = expman.open_run(exp.run_dir).info
    assert info["id"] == exp.uid and info["experiment"] == "vision" and info["name"] == "resnet"
    assert info["status"] == "finished"
    assert info["started_at"] <= info["ended_at"]
    assert info["world_size"] == 1 and info["ranks"][0]["status"] == "finished"
    assert info["ranks"][0]["last_step"] == 41
    assert info["software"]["python"]
    assert exp.run_dir == root / "vision" / f"resnet-{exp.uid}"


def test_exception_in_with_block_marks_failed_and_reraises(root):
    with pytest.raises(ZeroDivisionError):
        with expman.start_experiment("e", "boom", root=root) as exp:
            exp.log_metric("loss", 1.0, step=1)
            1 / 0
    info = expman.open_run(exp.run_dir).info
    assert info["status"] == "failed"
    assert info["error"]["type"] == "ZeroDivisionError"
    assert "1 / 0" in info["error"]["traceback"]
    assert expman.open_run(exp.run_dir).metrics().num_rows == 1


def test_keyboard_interrupt_marks_killed(root):
    with pytest.raises(KeyboardInterrupt):
        with expman.start_experiment("e", "ctrl-c", root=root) as exp:
            raise KeyboardInterrupt
    assert expman.open_run(exp.run_dir).info["status"] == "killed"


def test_child_runs_are_linked_both_ways(root):
    with expman.start_experiment("e", "parent", root=root) as parent:
        child = parent.start_experiment(name="eval")
        child.log_metric("val_loss", 0.3, step=1)
        child.finish()
    p, c = expman.open_run(parent.run_dir), expman.open_run(child.run_dir)
    assert c.info["parent"] == parent.uid
    assert p.info["children"] == [child.uid]
    assert c.info["experiment"] == "e" and c.status == "finished"
    assert points(c, "val_loss")[0]["value"] == 0.3


def test_reopen_by_uid_appends(root):
    with expman.start_experiment("e", "resume", root=root) as first:
        first.log_metric("loss", 1.0, step=1)
    with expman.start_experiment(experiment_uid=first.uid, root=root) as again:
        again.log_metric("loss", 0.5, step=2)
    assert again.run_dir == first.run_dir
    run = expman.open_run(first.uid, root=root)
    assert [p["step"] for p in points(run, "loss")] == [1, 2]
    assert run.status == "finished" and len(run.info["reopened_at"]) == 1
    with pytest.raises(expman.RunNotFoundError):
        expman.start_experiment(experiment_uid="nope1234", root=root)


def test_live_run_is_readable_within_a_second(root):
    exp = expman.start_experiment("e", "live", root=root)
    exp.log_metric("loss", 0.5, step=1)
    wait_for(lambda: exp.stats()["acked"] == 1, 10, "the first point to be acknowledged")
    for step in range(2, 1002):
        exp.log_metric("loss", 0.1, step=step)
    t0 = __import__("time").monotonic()
    wait_for(lambda: expman.open_run(exp.run_dir).metrics().num_rows == 1001, 30, "live rows")
    assert __import__("time").monotonic() - t0 < 30  # how soon: benchmarks/bench_tui.py (live, ~0.2 s p50)
    assert expman.open_run(exp.run_dir).status == "running"
    exp.finish()


def test_stats_count_sent_acked_buffered_dropped(root):
    exp = expman.start_experiment("e", "stats", root=root, code_dir=False)
    for step in range(500):
        exp.log_metric("loss", 0.1, step=step)
    assert exp.finish() is True
    assert exp.stats() == {"sent": 500, "acked": 500, "buffered": 0, "dropped": 0, "spilled": 0, "rejected": 0, "unacked_frames": 0,
                           "artifacts_stored": 0, "artifacts_failed": 0, "artifacts_pending": 0}
    exp.log_metric("loss", 0.1, step=501)  # after finish: counted as dropped, never silent
    assert exp.stats()["dropped"] == 1


def test_list_runs_newest_first(root):
    uids = []
    for name in ("a", "b", "c"):
        with expman.start_experiment("one" if name != "c" else "two", name, root=root) as exp:
            uids.append(exp.uid)
    assert [r.id for r in expman.list_runs(root)] == uids[::-1]
    assert [r.id for r in expman.list_runs(root, experiment="one")] == uids[1::-1]
    assert expman.open_run(f"one/a-{uids[0]}", root=root).id == uids[0]
    with pytest.raises(expman.RunNotFoundError):
        expman.open_run("missing", root=root)


def test_root_from_environment(root, monkeypatch):
    monkeypatch.setenv("EXPMAN_ROOT", str(root))
    with expman.start_experiment("env") as exp:
        exp.log_metric("x", 1.0)
    assert exp.run_dir.parent.parent == root
    assert expman.list_runs()[0].id == exp.uid


def test_a_broken_run_yaml_is_named_not_a_traceback(root):
    with expman.start_experiment("e", "good", root=root) as exp:
        exp.log_metric("x", 1.0)
    broken = root / "e" / "broken-00000000"
    broken.mkdir()
    (broken / "run.yaml").write_text("- just\n- a list\n")
    assert [r.id for r in expman.list_runs(root)] == [exp.uid]  # skipped, with a warning
    with pytest.raises(expman.ExpmanError, match="broken-00000000.*not a mapping"):
        expman.open_run(broken).info


def test_extreme_numbers_are_kept_or_named(root, caplog):
    with expman.start_experiment("e", "extreme", root=root) as exp:
        exp.log_metric("big_int", 2**62, step=2**62)
        exp.log_metric("huge_int", 10**400, step=1)      # no float64 holds it: ±inf, with an error
        exp.log_metric("far_step", 1.0, step=2**70)      # no int64 holds it: no step, with an error
    run = expman.open_run(exp.run_dir)
    assert points(run, "big_int")[0]["value"] == float(2**62) and points(run, "big_int")[0]["step"] == 2**62
    assert points(run, "huge_int")[0]["value"] == float("inf")
    assert points(run, "far_step")[0]["step"] is None
    assert "too large for float64" in caplog.text and "outside the int64 range" in caplog.text
