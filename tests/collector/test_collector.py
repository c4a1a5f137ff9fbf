"""The collector as its own process: late start, bad frames, crashes, restarts."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import zmq

import expman
from expman._wire import frames as proto
from _helpers import finish_behind_a_stopped_collector, wait_for
from conftest import start_collector


def test_collector_not_running_at_first_then_started(root, short_dir):
    endpoint = f"ipc://{short_dir}/late.sock"
    exp = expman.start_experiment("e", "late", root=root, collector=endpoint)
    t0 = time.perf_counter()
    for step in range(20_000):
        exp.log_metric("loss", 1.0, step=step)
    exp.log_parameters({"lr": 0.1})
    exp.info("logged before the collector existed")
    assert time.perf_counter() - t0 < 10.0, "logging must not wait for a collector"  # ~10 ms; a wait never ends
    assert exp.stats()["acked"] == 0
    c = start_collector(root, short_dir, endpoint)
    try:
        assert exp.finish(timeout=20) is True
        run = expman.open_run(exp.run_dir)
        assert run.status == "finished"
        assert run.metrics().num_rows == 20_000
        assert run.params == {"lr": 0.1}
        assert "before the collector existed" in run.log_text()
    finally:
        assert c.stop() == 0


def test_tcp_endpoint_with_port_zero(root, short_dir):
    c = start_collector(root, short_dir, "tcp://127.0.0.1:0")
    try:
        assert c.endpoint.startswith("tcp://127.0.0.1:") and not c.endpoint.endswith(":0")
        with expman.start_experiment("e", "tcp", root=root, collector=c.endpoint) as exp:
            exp.log_metric("loss", 0.5, step=1)
        assert expman.open_run(exp.run_dir).metrics().num_rows == 1
    finally:
        assert c.stop() == 0


def test_env_var_selects_the_collector(root, collector, monkeypatch):
    monkeypatch.setenv("EXPMAN_COLLECTOR", collector.endpoint)
    with expman.start_experiment("e", "env") as exp:
        exp.log_metric("x", 1.0)
    assert exp.run_dir.parent.parent == root  # the collector's root, reported back in the hello ack
    assert expman.open_run(exp.run_dir).metrics().num_rows == 1


def test_bad_frames_are_rejected_counted_and_the_collector_keeps_serving(root, collector):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(collector.endpoint)
    good_envelope = dict(v=1, kind="metrics", run="r1", host="h", rank=0, sender="s", seq=0, t=0.0, body={})
    bad = [
        b"\xc1 not msgpack",                                                   # not-msgpack
        msgpack.packb([1, 2, 3]),                                             # bad-shape
        msgpack.packb({**good_envelope, "v": 99, "seq": 10}),                 # bad-version
        msgpack.packb({**good_envelope, "kind": "explode", "seq": 11}),       # bad-kind
        msgpack.packb({**good_envelope, "rank": -1, "seq": 12}),              # bad-shape
        b"x" * (proto.MAX_FRAME_BYTES + 10),                                  # oversized
    ]
    for frame in bad:
        sock.send(frame)
    # A hello that tries to escape the root, then metrics with a broken body.
    sock.send(proto.encode_frame("hello", run="evil", host="h", rank=0, sender="s", seq=1, sent_at=0.0,
                                 body={"experiment": "..", "name": "x", "dir": "x"}))
    answers: dict[int, list[str]] = {}
    deadline = time.monotonic() + 10
    while not {1, 10, 11, 12} <= set(answers) and time.monotonic() < deadline:
        if sock.poll(500):
            ack = proto.decode_ack(sock.recv())
            for seq in ack.seqs:
                answers.setdefault(seq, []).append(ack.info[seq]["rejected"])
    assert answers.get(1) and "bad-values" in answers[1][0], "a rejected hello is still acknowledged"
    # The envelope refusals that carried a seq are answered too, with their reason.
    assert [answers[seq][0].split(":")[0] for seq in (10, 11, 12)] == ["bad-version", "bad-kind", "bad-shape"]
    wait_for(lambda: "not-msgpack" in collector.log() and "bad-version" in collector.log(), 10, "reject log lines")
    with expman.start_experiment("e", "after", root=root, collector=collector.endpoint) as exp:
        exp.log_metric("loss", 0.5, step=1)
    assert expman.open_run(exp.run_dir).metrics().num_rows == 1
    assert not (root.parent / "x").exists() and not any(root.glob("../x*"))
    assert collector.stop() == 0
    summary = collector.log()
    for reason in ("not-msgpack", "bad-shape", "bad-version", "bad-kind", "bad-values"):
        assert reason in summary, reason
    sock.close()


def test_a_frame_refused_for_an_unknown_run_is_taken_when_sent_again_behind_its_hello(root, collector):
    """A restarted collector refuses a run's frames until the run's hello comes again; the
    sender then sends the hello and, behind it, the refused frames. All three can land in
    one turn of the collector's loop (it was stopped while they came): the copy behind the
    hello is taken and acknowledged, not dropped as a duplicate of the refused one."""
    with expman.start_experiment("e", "template", root=root, collector=collector.endpoint) as exp:
        hello = dict(exp._channel.hello)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(collector.endpoint)

    def frame(kind: str, seq: int, body: dict) -> bytes:
        return proto.encode_frame(kind, run="reintroduced", host="h", rank=0, sender="s-turn", seq=seq,
                                  sent_at=time.time(), body=body)

    os.kill(collector.proc.pid, signal.SIGSTOP)
    try:
        sock.send(frame("params", 1, {"params": {"lr": 0.1}}))
        sock.send(frame("hello", 2, {**hello, "name": "reintroduced", "dir": "reintroduced"}))
        sock.send(frame("params", 1, {"params": {"lr": 0.1}}))
    finally:
        os.kill(collector.proc.pid, signal.SIGCONT)
    acked: set[int] = set()
    unknown: list[str] = []
    deadline = time.monotonic() + 30
    while acked != {1, 2} and time.monotonic() < deadline:
        if sock.poll(500):
            ack = proto.decode_ack(sock.recv())
            acked.update(ack.seqs)
            unknown.extend(ack.unknown_runs)
    sock.close()
    assert acked == {1, 2}, f"acked {sorted(acked)}, unknown runs {unknown}"
    run = expman.open_run(root / "e" / "reintroduced")
    assert run.params == {"lr": 0.1}


def test_sigterm_flushes_and_exits_cleanly(root, short_dir):
    c = start_collector(root, short_dir)
    exp = expman.start_experiment("e", "sigterm", root=root, collector=c.endpoint)
    for step in range(1000):
        exp.log_metric("loss", 0.5, step=step)
    wait_for(lambda: exp.stats()["acked"] == 1000, 10, "acks")
    assert c.stop() == 0
    run = expman.open_run(exp.run_dir)
    assert run.metrics().num_rows == 1000
    assert not list((run.path / ".wal").glob("*.wal")) or all(p.stat().st_size == 0 for p in (run.path / ".wal").glob("*.wal"))
    exp.finish(timeout=0.5)  # nobody listens any more: bounded, no hang


def test_kill_9_collector_keeps_acknowledged_data_readable_and_restart_recovers(root, short_dir):
    c = start_collector(root, short_dir)
    exp = expman.start_experiment("e", "crash", root=root, collector=c.endpoint)
    for step in range(5000):
        exp.log_metric("loss", float(step), step=step)
    wait_for(lambda: exp.stats()["acked"] == 5000, 10, "acks")
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    # Everything acknowledged is readable straight away (Parquet parts plus the WAL tail).
    run = expman.open_run(exp.run_dir)
    assert sorted(run.metrics()["step"].to_pylist()) == list(range(5000))
    # A new collector on the same root and socket: the rank keeps going and finishes.
    c2 = start_collector(root, short_dir, c.endpoint)
    try:
        for step in range(5000, 6000):
            exp.log_metric("loss", float(step), step=step)
        assert exp.finish(timeout=20) is True
        steps = run.metrics()["step"].to_pylist()
        assert sorted(steps) == list(range(6000)), "no point lost, none duplicated"
        assert run.status == "finished"
        wait_for(lambda: not (run.path / ".wal").exists(), 30, "the WAL to be folded away after finish")
        assert len(list((run.path / "metrics").glob("*.parquet"))) == 1
    finally:
        assert c2.stop() == 0


def test_frames_lost_with_a_dead_collector_go_again_to_its_successor(root, short_dir):
    """finish() waits on a stopped collector, which then dies with the frames still queued
    to it. A waiting sender does not resend on a timer (it would wake for nothing while a
    collector is merely slow); it learns of the new connection from ZeroMQ and sends again
    everything unacknowledged, so finish() returns True well within its timeout."""
    c = start_collector(root, short_dir)
    exp = expman.start_experiment("e", "lost-queue", root=root, collector=c.endpoint)
    exp.log_metric("loss", 0.0, step=0)
    wait_for(lambda: exp.stats()["acked"] == 1, 10, "the first point's ack")
    waiter, result = finish_behind_a_stopped_collector(exp, c.proc.pid, 3000, timeout=25)
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    c2 = start_collector(root, short_dir, c.endpoint)
    try:
        waiter.join(60)
        assert result == [True]
        run = expman.open_run(exp.run_dir)
        assert sorted(run.metrics()["step"].to_pylist()) == list(range(3000)), "no point lost, none duplicated"
        assert run.status == "finished"
    finally:
        assert c2.stop() == 0


def test_heartbeat_timeout_marks_a_vanished_rank_crashed(root, short_dir, run_script):
    c = start_collector(root, short_dir, None, "--heartbeat-timeout", "1")
    try:
        result = run_script(f"""
            import os, expman
            exp = expman.start_experiment("e", "vanish", root={str(root)!r}, collector={c.endpoint!r})
            exp.log_metric("loss", 1.0, step=1)
            exp.finish  # never called: the process dies without a word
            import time
            while exp.stats()["acked"] < 1:
                time.sleep(0.01)
            print(exp.run_dir, flush=True)
            os._exit(0)
        """)
        run_dir = result.stdout.strip()
        wait_for(lambda: expman.open_run(run_dir).status == "crashed", 10, "crashed status")
        assert expman.open_run(run_dir).metrics().num_rows == 1
    finally:
        assert c.stop() == 0


def test_config_file_sets_root_and_endpoints(tmp_path, short_dir):
    import subprocess
    import sys

    import yaml

    root = tmp_path / "from-config"
    config = tmp_path / "collector.yaml"
    config.write_text(yaml.safe_dump({"root": str(root), "bind": [f"ipc://{short_dir}/cfg.sock"], "log_level": "DEBUG"}))
    ready = tmp_path / "ready.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "expman.collector", "--config", str(config), "--ready-file", str(ready)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready.exists, 15, "ready file")
        endpoint = yaml.safe_load(ready.read_text())["endpoints"][0]
        assert endpoint == f"ipc://{short_dir}/cfg.sock"
        with expman.start_experiment("e", "cfg", collector=endpoint, root=tmp_path / "ignored") as exp:
            exp.log_metric("x", 1.0)
        assert exp.run_dir.parent.parent == root
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("rooot: /tmp\n")
    result = subprocess.run([sys.executable, "-m", "expman.collector", "--config", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "unknown settings ['rooot']" in result.stderr


def test_repeated_kill_9_while_writing_and_merging_loses_and_duplicates_nothing(root, short_dir):
    """The collector is killed at several moments of a live run (mid-write, mid-flush, mid-merge
    of parts); each time a new one takes over the socket. Every point lands exactly once."""
    import random
    import threading

    c = start_collector(root, short_dir)
    endpoint = c.endpoint
    exp = expman.start_experiment("e", "chaos", root=root, collector=endpoint, finish_timeout=60)
    n = 60_000
    done = threading.Event()

    def log_points() -> None:
        for step in range(n):
            exp.log_metric("loss", float(step), step=step)
            if step % 500 == 0:
                time.sleep(0.01)  # a few seconds of logging, so flushes and merges happen meanwhile
        done.set()

    writer = threading.Thread(target=log_points)
    writer.start()
    rng = random.Random(7)
    kills = 0
    try:
        while not done.is_set() or kills < 4:
            time.sleep(rng.uniform(0.2, 0.9))
            os.kill(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
            kills += 1
            c = start_collector(root, short_dir, endpoint)
        writer.join()
        assert exp.finish() is True
        steps = expman.open_run(exp.run_dir).metrics("loss")["step"].to_pylist()
        assert len(steps) == n and sorted(steps) == list(range(n)), f"{len(steps)} rows after {kills} kills"
        assert expman.open_run(exp.run_dir).status == "finished"
    finally:
        assert c.stop() == 0
