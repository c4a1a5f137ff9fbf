"""When the sender sends: a slow run's points wait to share a frame (the SendWindow rule), nothing
is lost or reordered; and a frame is resent only when it looks lost, not merely queued.

The collector pays per frame far more than per point, so the sender holds a run's few
waiting points until the send window ends or enough gather (expman/_wire/delivery.py).
These tests check what that rule means, never how fast: a window of an hour makes
"held" observable without a clock, and a frame the sender sends at once (parameters)
proves it has looked at the run since the points were logged.
"""

from __future__ import annotations

from typing import Any

import pytest

import expman
from _helpers import wait_for
from expman._rank.sender import Sender
from expman._wire import frames as proto
from expman._wire.delivery import BATCH_POINTS, Entry, Outbox, SendWindow

HOUR = "3600"


def test_the_rule_holds_few_points_until_the_window_ends():
    rule = SendWindow(window=0.25, points=8, longest=1.0)
    assert rule.holds(1, None, now=5.0)  # first seen now: wait
    assert rule.holds(7, 5.0, now=5.2)
    assert not rule.holds(7, 5.0, now=5.25)  # the window is over
    assert not rule.holds(8, None, now=5.0)  # enough points for a frame: at once
    assert not SendWindow(window=0).holds(1, None, now=5.0)  # 0: every tick, as before


def test_windows_end_on_a_shared_grid_of_half_windows():
    rule = SendWindow(window=0.25)
    ends = {rule.ends(since) for since in (5.0, 5.01, 5.1, 5.124)}
    assert ends == {5.25}, "runs first seen within one half-window go out together"
    for since in (5.0, 5.124, 7.3):
        assert 0.125 <= rule.ends(since) - since <= 0.25


def test_the_window_widens_for_a_collector_slow_to_acknowledge():
    rule = SendWindow(window=0.25, longest=1.0)
    rule.follow(0.02)
    assert rule.window == 0.25
    rule.follow(0.15)
    assert rule.window == pytest.approx(0.6)
    rule.follow(3.0)
    assert rule.window == 1.0
    rule.follow(0.01)
    assert rule.window == 0.25
    off = SendWindow(window=0)
    off.follow(3.0)
    assert off.window == 0


@pytest.fixture
def metrics_frames(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The point count of every metrics frame the sender makes (the real method, observed)."""
    seen: list[int] = []
    enqueue = Sender._enqueue

    def spy(self: Sender, run: Any, kind: str, body: dict[str, Any], points: int = 0, token: Any = None,
            **kwargs: Any) -> None:
        if kind == proto.METRICS:
            seen.append(points)
        enqueue(self, run, kind, body, points, token, **kwargs)

    monkeypatch.setattr(Sender, "_enqueue", spy)
    return seen


def test_a_slow_runs_points_wait_and_finish_sends_them_at_once_in_order(collector, monkeypatch, metrics_frames):
    monkeypatch.setenv("EXPMAN_SEND_WINDOW", HOUR)
    exp = expman.start_experiment("e", "slow", collector=collector.endpoint, root=collector.root)
    for step in range(20):
        exp.log_metric("loss", step / 10, step=step)
        exp.log_metric("lr", 1.0, step=step)
    exp.log_parameter("seen", True)  # goes at once: once it is acked, the sender has drained this run
    wait_for(lambda: exp.stats()["unacked_frames"] == 0 and exp.stats()["acked"] == 0 and metrics_frames == [],
             30, "the parameters frame acknowledged")
    assert exp.stats()["sent"] == 0 and exp.stats()["buffered"] == 40  # held, and counted as buffered
    assert exp.finish(timeout=60), "finish() sends what is held without waiting out the window"
    assert metrics_frames == [40], "40 points in one frame"
    run = expman.open_run(exp.run_dir)
    table = run.metrics()
    rows = sorted(zip(table.column("key").to_pylist(), table.column("step").to_pylist(),
                      table.column("value").to_pylist()))
    assert rows == sorted([("loss", s, s / 10) for s in range(20)] + [("lr", s, 1.0) for s in range(20)])
    assert run.status == "finished"


def test_a_fast_run_is_not_held(collector, monkeypatch, metrics_frames):
    monkeypatch.setenv("EXPMAN_SEND_WINDOW", HOUR)
    exp = expman.start_experiment("e", "fast", collector=collector.endpoint, root=collector.root)
    for step in range(BATCH_POINTS):
        exp.log_metric("loss", 0.5, step=step)
    wait_for(lambda: exp.stats()["acked"] == BATCH_POINTS, 30, "a full batch sent without waiting an hour")
    assert sum(metrics_frames) == BATCH_POINTS
    assert exp.finish(timeout=60)


def test_held_points_go_when_the_window_ends(collector, monkeypatch, metrics_frames):
    monkeypatch.setenv("EXPMAN_SEND_WINDOW", "0.05")
    exp = expman.start_experiment("e", "window", collector=collector.endpoint, root=collector.root)
    for step in range(3):
        exp.log_metric("loss", 0.5, step=step)
    wait_for(lambda: exp.stats()["acked"] == 3, 30, "held points sent once the window ended, with no finish")
    assert exp.finish(timeout=60)
    assert sum(metrics_frames) == 3
    steps = expman.open_run(exp.run_dir).metrics().column("step").to_pylist()
    assert sorted(steps) == [0, 1, 2]


def _outbox_with_three_sent() -> Outbox:
    box = Outbox(resend_after=1.0)
    for seq in range(3):
        box.add(Entry(seq, b"x", 1))
    for entry in box.due():  # sent() moves it along
        box.sent(entry, now=0.0)
    return box


def test_a_frame_queued_behind_a_busy_collector_is_not_resent():
    box = _outbox_with_three_sent()
    box.acked(0, now=0.5)  # the collector answers, in order, slowly
    assert box.expire(now=1.2) == [], "not lost, only queued: no duplicate"
    assert [e.seq for e in box.expire(now=2.0)] == [1, 2], "silence for a whole resend wait: sent again"


def test_a_frame_skipped_by_the_collector_is_resent():
    box = _outbox_with_three_sent()
    box.acked(2, now=0.5)  # a later frame answered: seq 1 was skipped (one connection keeps order)
    assert [e.seq for e in box.expire(now=1.2)] == [0, 1]


def test_a_waiting_sender_is_woken_only_for_frames_left_unanswered():
    """What a sender waiting for acks sleeps until: frames sent into a silence (a stopped
    collector) never set an alarm; a frame the collector skipped does, at the time `expire`
    resends it, and so does one it left unanswered while it answered others."""
    box = _outbox_with_three_sent()
    assert box.next_resend_at() is None, "silence alone: nothing to wake for"
    box.acked(2, now=0.5)  # seqs 0 and 1 were skipped: sent before 2, which is acknowledged
    assert box.next_resend_at() == 1.0
    assert [e.seq for e in box.expire(now=1.01)] == [0, 1]
    for entry in box.due():
        box.sent(entry, now=1.01)
    assert box.next_resend_at() is None, "resent after the last ack: sent into a silence"

    box = _outbox_with_three_sent()
    box.acked(0, now=0.5)  # answers come, then stop: 1 and 2 were sent before the last one
    assert box.next_resend_at() == 1.5, "once the collector has been silent for a resend wait"
    assert [e.seq for e in box.expire(now=1.51)] == [1, 2]


def test_a_new_connection_sends_every_unacknowledged_frame_again():
    box = _outbox_with_three_sent()
    box.acked(1, now=0.1)
    box.add(Entry(3, b"x", 1))  # not sent yet: it goes anyway, once
    assert [e.seq for e in box.resend_all()] == [0, 2]
    sent = []
    for entry in box.due():
        sent.append(entry.seq)
        box.sent(entry, now=0.2)
    assert sent == [3, 0, 2]
