"""A real collector process against hostile frames: it stays up, answers every frame that has a
sequence number, keeps rejected values out of the run, and lets no sender touch another's frames."""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import expman
from expman._wire import frames as proto
from _helpers import wait_for
from _peer import Peer, metrics_body
from conftest import start_collector

INF, NAN = float("inf"), float("nan")


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


def run_yaml(root: Path) -> dict:
    found = list(root.glob("e/*/run.yaml"))
    assert len(found) == 1, found
    return yaml.safe_load(found[0].read_text())


HELLO = {"experiment": "e", "name": "hostile", "world_size": 2, "pid": 1234, "started_at": 1_700_000_000.0}
CHUNK0 = {"id": 1, "i": 0, "data": b"", "last": False, "name": "a.txt", "size": 10, "chunk": 1024,
          "encrypt": False, "time": 1_700_000_000.0}
ATTACKS = [  # (what, kind, body, envelope)
    ("hello t=inf", proto.HELLO, HELLO, {"sent_at": INF}),
    ("hello started_at=1e300", proto.HELLO, {**HELLO, "started_at": 1e300}, {}),
    ("hello started_at in ms", proto.HELLO, {**HELLO, "started_at": 1.7e12}, {}),
    ("hello world_size=inf", proto.HELLO, {**HELLO, "world_size": INF}, {}),
    ("hello world_size=10**9", proto.HELLO, {**HELLO, "world_size": 10**9}, {}),
    ("hello pid nested 400 deep", proto.HELLO, {**HELLO, "pid": nested(400)}, {}),
    ("hello rank 10**9", proto.HELLO, HELLO, {"rank": 10**9}),
    ("hello rank outside world_size", proto.HELLO, HELLO, {"rank": 2}),
    ("hello 300 tags", proto.HELLO, {**HELLO, "tags": ["t"] * 300}, {}),
    ("hello software nested", proto.HELLO, {**HELLO, "software": {"a": nested(50)}}, {}),
    ("hello heartbeat_interval=nan", proto.HELLO, {**HELLO, "heartbeat_interval": NAN}, {}),
    ("hello hardware_interval=0", proto.HELLO, {**HELLO, "log_hardware": True, "hardware_interval": 0}, {}),
    ("hello reopen=[]", proto.HELLO, {**HELLO, "reopen": []}, {}),
    ("finish ended_at=inf", proto.FINISH, {"status": "finished", "ended_at": INF}, {}),
    ("finish status crashed", proto.FINISH, {"status": "crashed"}, {}),
    ("finish error nested", proto.FINISH, {"status": "failed", "error": {"type": nested(400)}}, {}),
    ("finish last_step 2**64-1", proto.FINISH, {"status": "finished", "last_step": 2**64 - 1}, {}),
    ("finish from rank 1 of a 1-rank run", proto.FINISH, {"status": "finished"}, {"rank": 1}),
    ("artifact time=nan", proto.ARTIFACT, {**CHUNK0, "time": NAN}, {}),
    ("artifact size 2**64-1", proto.ARTIFACT, {**CHUNK0, "size": 2**64 - 1}, {}),
    ("metrics time 1e300", proto.METRICS, {**metrics_body([1]), "times": [1e300]}, {}),
    ("metrics time in ms", proto.METRICS, {**metrics_body([1]), "times": [1.7e12]}, {}),
    ("metrics step 2**64-1", proto.METRICS, {**metrics_body([1]), "steps": [2**64 - 1]}, {}),
    ("metrics text time nan", proto.METRICS, {**metrics_body([]), "texts": [[0, "x", 1, NAN]]}, {}),
    ("metrics text 2 MiB", proto.METRICS, {**metrics_body([]), "texts": [[0, "x" * (2 << 20), 1, None]]}, {}),
    ("metrics key id -1", proto.METRICS, {**metrics_body([1]), "keys": {-1: "k"}}, {}),
    ("log time inf", proto.LOG, {"lines": [[INF, "info", "x"]]}, {}),
    ("log level nested", proto.LOG, {"lines": [[1.0, nested(400), "x"]]}, {}),
    ("log text 2 MiB", proto.LOG, {"lines": [[1.0, "info", "x" * (2 << 20)]]}, {}),
    ("params bytes", proto.PARAMS, {"params": {"a": b"\x00"}}, {}),
    ("params 2 MiB string", proto.PARAMS, {"params": {"a": "x" * (2 << 20)}}, {}),
    ("code nested 400 deep", proto.CODE, {"code": {"a": nested(400)}}, {}),
    ("seq 2**64-1", proto.LOG, {"lines": [[1.0, "info", "x"]]}, {"seq": 2**64 - 1}),
    ("low 2**63", proto.LOG, {"lines": [[1.0, "info", "x"]]}, {"low": 2**63}),
    ("t in ms", proto.LOG, {"lines": [[1.0, "info", "x"]]}, {"sent_at": 1.7e12}),
]


def test_hostile_values_of_every_kind_are_refused_answered_and_kept_out_of_the_run(root, collector):
    peer = Peer(collector.endpoint)
    first = peer.hello(world_size=1)
    assert "run_dir" in peer.wait([first])[first]
    sent = {}
    for what, kind, body, envelope in ATTACKS:
        sent[peer.send(kind, body, **envelope)] = what
    # Frames without a seq are not answered, but must not hurt either.
    peer.send(proto.HEARTBEAT, {"pid": nested(400), "last_step": 2**64 - 1}, seq=None)
    peer.send(proto.HEARTBEAT, {}, seq=None, sent_at=NAN)
    peer.send(proto.HELLO, {**HELLO, "started_at": INF}, seq=None)
    answers = peer.wait(list(sent))
    for seq, what in sent.items():
        assert "rejected" in answers[seq], f"{what} was not refused: {answers[seq]}"
    assert collector.proc.poll() is None, collector.log()

    # The run's state kept none of it, and its periodic run.yaml write still works.
    wait_for(lambda: run_yaml(collector.root)["ranks"][0].get("last_heartbeat"), 10, "run.yaml")
    info = run_yaml(collector.root)
    assert info["status"] == "running" and info["world_size"] == 1 and list(info["ranks"]) == [0]
    assert info["started_at"].startswith("2023-11-14T22:13:20") and info["tags"] == []
    assert info["ranks"][0]["pid"] == 1234 and "code" not in info
    peer.send(proto.HEARTBEAT, {"pid": 1234, "last_step": None}, seq=None)
    time.sleep(1.5)  # past the once-a-second run.yaml rewrite
    done = peer.send(proto.FINISH, {"status": "finished", "ended_at": time.time(), "last_step": None})
    assert peer.wait([done])[done] == {}
    assert collector.proc.poll() is None
    run = expman.open_run(run_yaml(collector.root)["id"], root=collector.root)
    assert run.status == "finished" and run.params == {} and run.log_text() == ""
    assert run.metrics().num_rows == 0
    assert collector.stop() == 0
    log = collector.log()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
    peer.close()


def test_a_low_floor_from_another_process_does_not_silence_its_sender(root, collector):
    exp = expman.start_experiment("e", "victim", root=root, collector=collector.endpoint)
    for step in range(100):
        exp.log_metric("loss", float(step), step=step)
    wait_for(lambda: exp.stats()["acked"] == 100, 20, "the victim's first points")
    attacker = Peer(collector.endpoint, sender=exp._sender.sender_id, run=exp.uid)
    line = {"lines": [[time.time(), "info", "x"]]}
    # (Seqs the victim has used: a frame with a seq it has not used yet would take that
    # number from it; sender ids are secrets for that reason, see docs/reliability.md.)
    attacks = [attacker.send(proto.LOG, line, seq=0, low=2**63),  # refused: no sender counts that far
               attacker.send(proto.LOG, line, seq=1, low=10**9),  # ignored: above its own seq
               attacker.send(proto.LOG, line, seq=10**9, low=10**9, run="nosuchrun")]  # ignored: never seen
    attacker.wait(attacks[:2])
    attacker.wait([], or_unknown="nosuchrun")
    for step in range(100, 6000):
        exp.log_metric("loss", float(step), step=step)
    assert exp.finish(timeout=30) is True
    steps = expman.open_run(exp.run_dir).metrics("loss")["step"].to_pylist()
    assert sorted(steps) == list(range(6000)), f"{6000 - len(steps)} of the victim's points lost"
    assert exp.stats()["dropped"] == 0
    attacker.close()


def test_finished_stays_finished_and_frames_apply_once_across_restarts(root, short_dir):
    """Resent frames and re-introductions, in any order, after kill -9 of the collector."""
    c = start_collector(root, short_dir)
    endpoint = c.endpoint
    peers = [Peer(endpoint), Peer(endpoint)]  # ranks 0 and 1 of one run, each its own process
    started = [time.time(), time.time() + 1]
    seqs = {}
    for rank, peer in enumerate(peers):
        seqs[rank] = {
            "hello": peer.hello(rank=rank, world_size=2, started_at=started[rank]),
            "params": peer.send(proto.PARAMS, {"params": {"lr": 0.1}}, rank=rank),
            "log": peer.send(proto.LOG, {"lines": [[time.time(), "info", f"rank {rank} exactly once"]]}, rank=rank),
            "finish": peer.send(proto.FINISH, {"status": "finished", "ended_at": time.time()}, rank=rank),
        }
        peer.wait(list(seqs[rank].values()))

    def resend(rank: int) -> list[int]:
        peer = peers[rank]
        return [peer.send(proto.LOG, {"lines": [[time.time(), "info", f"rank {rank} exactly once"]]},
                          seq=seqs[rank]["log"], rank=rank),
                peer.send(proto.PARAMS, {"params": {"lr": 0.1}}, seq=seqs[rank]["params"], rank=rank),
                peer.send(proto.FINISH, {"status": "finished", "ended_at": time.time()}, seq=seqs[rank]["finish"],
                          rank=rank)]

    def reintroduce(rank: int) -> None:
        peers[rank].wait([peers[rank].hello(rank=rank, world_size=2, started_at=started[rank], reopen=True)])

    for order in ("reintroduce-first", "resend-first", "introduction-without-seq"):
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait()
        c = start_collector(root, short_dir, endpoint)
        for peer in peers:
            peer.answers.clear()
            peer.unknown.clear()
        if order == "reintroduce-first":  # the rank's resends meet an unknown run; it says hello again
            resend(0)
            peers[0].wait([], or_unknown=peers[0].run)
            reintroduce(0)
            answered = peers[0].wait(resend(0))
        elif order == "resend-first":  # another rank's hello opened the run: the finish comes before the hello
            reintroduce(1)
            answered = peers[0].wait(resend(0))
            reintroduce(0)
        else:  # a spool replay introduces the run without a seq
            peers[0].send(proto.HELLO, {**HELLO, "started_at": started[0], "reopen": True}, seq=None)
            answered = peers[0].wait(resend(0))
        assert all("rejected" not in info for info in answered.values()), answered
        info = run_yaml(root)
        assert info["status"] == "finished", (order, info)
        assert {r: v["status"] for r, v in info["ranks"].items()} == {0: "finished", 1: "finished"}, (order, info)
    run = expman.open_run(info["id"], root=root)
    assert run.log_text().count("rank 0 exactly once") == 1, run.log_text()
    assert run.log_text().count("rank 1 exactly once") == 1, run.log_text()
    assert run.params == {"lr": 0.1} and "reopened_at" not in run.info
    assert c.stop() == 0
    for peer in peers:
        peer.close()


RANK_SCRIPT = """
import sys, time, expman
rank, endpoint, root, flag = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
exp = expman.start_experiment("e", "four", root=root, collector=endpoint, rank=rank, world_size=4,
                              run_id="four0001", finish_timeout=90)
for step in range(400):
    exp.log_metric("loss", 1.0 / (step + 1), step=step)
    if step % 20 == 0:
        exp.info(f"rank {rank} line {step // 20}")
    time.sleep(0.008)
open(flag, "w").close()
print(exp.finish(), flush=True)
"""


def test_four_ranks_finish_through_three_collector_kills(root, short_dir, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    c = start_collector(root, short_dir)
    endpoint = c.endpoint
    flags = [tmp_path / f"finishing-{r}" for r in range(4)]
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), endpoint, str(root), str(flags[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(4)]
    try:
        wait_for(lambda: list(root.glob("e/*/run.yaml")) and len(run_yaml(root)["ranks"]) == 4, 60, "four ranks")
        moments = [lambda: time.sleep(0.5), lambda: time.sleep(0.7),
                   lambda: wait_for(lambda: any(f.exists() for f in flags), 60, "a rank to finish")]
        for wait in moments:
            wait()
            os.kill(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
            c = start_collector(root, short_dir, endpoint)
        outputs = [p.communicate(timeout=120) for p in ranks]
        assert [out.strip() for out, _ in outputs] == ["True"] * 4, outputs
        info = run_yaml(root)
        assert info["status"] == "finished", info
        assert {r: v["status"] for r, v in info["ranks"].items()} == {r: "finished" for r in range(4)}
        run = expman.open_run(info["id"], root=root)
        lines = [line for line in run.log_text().splitlines() if " line " in line]
        expected = sorted(f"rank {r} line {k}" for r in range(4) for k in range(20))
        assert sorted(line.split("INFO ")[1] for line in lines) == expected, "every log line exactly once"
        assert run.metrics("loss").num_rows == 4 * 400
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert c.stop() == 0


def test_a_killed_rank_shows_its_last_stored_step(root, short_dir, run_script):
    c = start_collector(root, short_dir, None, "--heartbeat-timeout", "1")
    try:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import time, expman
            exp = expman.start_experiment("e", "killed", root={str(root)!r}, collector={c.endpoint!r},
                                          heartbeat_interval=60)
            for step in range(1234):
                exp.log_metric("loss", 1.0, step=step)
            while exp.stats()["acked"] < 1234:
                time.sleep(0.01)
            print(exp.run_dir, flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
        run_dir = proc.stdout.readline().strip()
        proc.kill()  # kill -9: no finish, no last heartbeat
        proc.wait()
        wait_for(lambda: expman.open_run(run_dir).status == "crashed", 20, "crashed status")
        run = expman.open_run(run_dir)
        assert run.info["ranks"][0]["last_step"] == 1233
        assert run.rank_stats().to_pylist()[0]["last_step"] == 1233
    finally:
        assert c.stop() == 0


def modes(path: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of everything under `path`; what the collector removes while
    we look (a WAL segment folded into a part, a temp file renamed) is skipped."""
    found = set()
    for p in [path, *path.rglob("*")]:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        found.add(("dir" if stat.S_ISDIR(st.st_mode) else "file", stat.S_IMODE(st.st_mode)))
    return found


@pytest.mark.parametrize("extra,folder,file", [((), 0o700, 0o600), (("--group-readable",), 0o750, 0o640)])
def test_run_files_are_private_to_the_collector_user_by_default(root, short_dir, tmp_path, extra, folder, file):
    c = start_collector(root, short_dir, None, *extra)
    try:
        src = tmp_path / "a.txt"
        src.write_text("artifact")
        exp = expman.start_experiment("e", "private", root=root, collector=c.endpoint)
        exp.log_parameters({"lr": 0.1})
        exp.info("a line")
        for step in range(100):
            exp.log_metric("loss", 1.0, step=step)
        exp.log_artifact(src)
        wait_for(lambda: exp.stats()["acked"] == 100, 60, "the points stored")  # in the WAL; a part at finish
        run_dir = next(root.glob("e/*"))
        live = modes(run_dir)  # WAL segments and the delivery record too, while the run is live
        assert exp.finish(timeout=30) is True
        found = live | modes(run_dir)
        assert {m for kind, m in found if kind == "dir"} == {folder}, found
        assert {m for kind, m in found if kind == "file"} == {file}, found
        assert (run_dir / "artifacts").is_dir() and (run_dir / "run.log").exists()
    finally:
        assert c.stop() == 0


def test_api_refuses_at_the_call_what_the_collector_refuses(root, collector):
    from expman._rank.values import check_log_text

    exp = expman.start_experiment("e", "api", root=root, collector=collector.endpoint)
    with pytest.raises(ValueError, match="'t'.*at most 1048576"):
        exp.log_metric("t", "x" * (2 << 20))
    with pytest.raises(ValueError, match="'loss'.*milliseconds\\?"):
        exp.log_metric("loss", 1.0, timestamp=time.time() * 1000)
    with pytest.raises(ValueError, match="'loss'.*outside"):
        exp.log_metric("loss", 1.0, timestamp=1e300)
    with pytest.raises(ValueError, match="at most 1048576"):
        exp.log_parameters({"a": "x" * (2 << 20)})
    with pytest.raises(ValueError, match="at most 1048576"):
        check_log_text("x" * (2 << 20))
    with pytest.raises(ValueError, match="at most 256 tags"):
        expman.start_experiment("e", "tags", root=root, collector=collector.endpoint, tags=["t"] * 300)
    with pytest.raises(ValueError, match="longer than 256"):
        expman.start_experiment("e", "tags", root=root, collector=collector.endpoint, tags=["t" * 300])
    with pytest.raises(ValueError, match="world size"):
        expman.start_experiment("e", "wide", root=root, collector=collector.endpoint, rank=0, world_size=2**21)
    exp.log_metric("loss", 1.0, timestamp=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), step=1)
    assert exp.finish(timeout=20) is True
    run = expman.open_run(exp.run_dir)
    assert run.metrics().num_rows == 1 and exp.stats()["dropped"] == 0
