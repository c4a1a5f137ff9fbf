"""Runs in a bucket: collectors with a URI root stage runs on local disk and upload them to a
real S3-protocol server (moto, on loopback); readers open them from the bucket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import pytest
import yaml

import expman
from expman.collector._bucket import BucketMirror, covered_parts
from _helpers import wait_for
from _peer import Peer, metrics_body
from expman._wire import frames as proto
from expman._storage.crypto import create_key_file
from expman._wire.frames import ARTIFACT_CHUNK_BYTES

POINTS = 2000
WORLD = 4


class Hosts:
    """Collectors that stand for hosts: each its own --name, staging folder and socket; no shared folder."""

    def __init__(self, tmp_path: Path, short_dir: Path, uri: str) -> None:
        self.tmp_path, self.short_dir, self.uri = tmp_path, short_dir, uri
        self.procs: dict[str, subprocess.Popen] = {}
        self.endpoints: dict[str, str] = {}

    def start(self, name: str, *extra: str) -> str:
        ready = self.tmp_path / f"{name}.ready"
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", "expman.collector", "--root", self.uri, "--name", name,
                "--staging-dir", str(self.tmp_path / f"state-{name}" / "staging"), "--upload-interval", "0.3",
                "--bind", f"ipc://{self.short_dir}/{name}.sock", "--ready-file", str(ready), "--log-level", "DEBUG", *extra]
        log = open(self.tmp_path / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stderr=log, stdout=subprocess.DEVNULL)
        log.close()
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30, f"collector {name}")
        assert proc.poll() is None, self.log(name)
        self.procs[name] = proc
        self.endpoints[name] = yaml.safe_load(ready.read_text())["endpoints"][0]
        return self.endpoints[name]

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> int:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"collector {name} did not exit on SIGTERM: {self.log(name)[-2000:]}")

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket on the module's moto server; its root URI."""
    name = f"b{uuid.uuid4().hex[:10]}"
    s3_server.filesystem().create_dir(name)
    return f"s3://{name}/team"


@pytest.fixture
def hosts(tmp_path: Path, short_dir: Path, bucket: str) -> Iterator[Hosts]:
    h = Hosts(tmp_path, short_dir, bucket)
    try:
        yield h
    finally:
        h.close()


RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import expman
    gate = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    encrypt = bool(os.environ.get("TEST_ENCRYPT"))
    with expman.start_experiment("bucket", "job", code_dir=False, encrypt_artifacts=encrypt) as exp:
        exp.log_parameters({"lr": 0.1, "seed": exp.rank})
        blob = Path(os.environ["TEST_BLOBS"]) / f"rank{exp.rank}.bin"
        exp.log_artifact(blob, name=f"weights/rank{exp.rank}.bin")
        for step in range(POINTS):
            if gate is not None and step == POINTS // 2:
                (gate.parent / f"half-{exp.rank}").touch()
                while not gate.exists():
                    time.sleep(0.01)
            exp.log_metric("loss", float(step), step=step)
        exp.info(f"rank {exp.rank} says hi")
""").replace("POINTS", str(POINTS))


def launch_ranks(tmp_path: Path, endpoint_of_rank: dict[int, str], host_of_rank: dict[int, str],
                 gate: Path | None = None) -> list[subprocess.Popen]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    ranks = []
    for rank in range(WORLD):
        (blobs / f"rank{rank}.bin").write_bytes(blob(rank))
        env = {**os.environ, "TEST_BLOBS": str(blobs), "EXPMAN_RUN_ID": "bucket-job", "EXPMAN_RANK": str(rank), "EXPMAN_WORLD_SIZE": str(WORLD),
               "EXPMAN_COLLECTOR": endpoint_of_rank[rank], "EXPMAN_HOST": host_of_rank[rank]}
        args = [sys.executable, str(script)] + ([str(gate)] if gate else [])
        ranks.append(subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True))
    return ranks


def blob(rank: int) -> bytes:
    """Rank's artifact: two and a bit transfer chunks, different per rank."""
    return bytes([rank]) * (2 * ARTIFACT_CHUNK_BYTES + 7 + rank)


def wait_ranks(ranks: list[subprocess.Popen]) -> None:
    for proc in ranks:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err


def finished_run(uri: str, hosts: Hosts) -> expman.Run:
    def status() -> str | None:
        try:
            (run,) = expman.list_runs(uri)
            return run.status if run.status == "finished" else None
        except ValueError:
            return None
        except expman.ExpmanError:  # moto, resumed after SIGSTOP, once served a run.yaml cut short
            return None             # while it was being replaced; the wait reads it again

    try:
        wait_for(status, 60, "the run to be finished in the bucket")
    except AssertionError:
        raise AssertionError("\n".join(hosts.log(n)[-3000:] for n in hosts.endpoints)) from None
    (run,) = expman.list_runs(uri)
    return run


def assert_every_point_once(run: expman.Run) -> None:
    info = run.info
    assert sorted(info["ranks"]) == list(range(WORLD)) and sorted(info["hosts"]) == ["node-a", "node-b"]
    assert all(v["status"] == "finished" for v in info["ranks"].values()), info["ranks"]
    table = run.metrics("loss")
    for rank in range(WORLD):
        steps = table.filter(table["rank"].to_numpy() == rank)["step"].to_pylist()
        assert sorted(steps) == list(range(POINTS)), (rank, len(steps))
    assert run.params == {"lr": 0.1, "seed": 0}
    assert sorted(info["param_conflicts"]["seed"]) == list(range(WORLD))
    text = run.log_text()
    assert all(text.count(f"rank {r} says hi") == 1 for r in range(WORLD)), text
    assert sorted(a.name for a in run.artifacts()) == [f"weights/rank{r}.bin" for r in range(WORLD)]
    for r in range(WORLD):
        assert run.read_artifact(f"weights/rank{r}.bin") == blob(r)


def bucket_files(uri: str) -> list[str]:
    files, path = expman._storage.files.locate(uri)  # type: ignore[attr-defined]
    infos = files.filesystem.get_file_info(pafs.FileSelector(str(path), recursive=True, allow_not_found=True))
    return sorted(i.path[len(str(path)) + 1:] for i in infos if i.type == pafs.FileType.File)


def two_hosts(hosts: Hosts) -> tuple[dict[int, str], dict[int, str]]:
    a, b = hosts.start("node-a"), hosts.start("node-b")
    return {r: a if r % 2 == 0 else b for r in range(WORLD)}, {r: "node-a" if r % 2 == 0 else "node-b" for r in range(WORLD)}


def test_two_collectors_write_one_run_into_a_bucket_with_every_point_once(hosts, bucket, tmp_path, monkeypatch):
    """Artifacts encrypted here (the others are plain): each host uploads its own objects and manifest."""
    create_key_file(tmp_path / "master.key")
    monkeypatch.setenv("EXPMAN_KEY_FILE", str(tmp_path / "master.key"))  # collectors and the reader
    monkeypatch.setenv("TEST_ENCRYPT", "1")
    endpoints, host_names = two_hosts(hosts)
    wait_ranks(launch_ranks(tmp_path, endpoints, host_names))
    run = finished_run(bucket, hosts)
    assert run.location.startswith(f"{bucket}/bucket/job-bucket-job")
    assert_every_point_once(run)
    names = bucket_files(bucket)
    assert {n.split("/", 2)[2] for n in names if "/hosts/" in n} == {"hosts/node-a.yaml", "hosts/node-b.yaml"}
    assert any(n.endswith("/logs/node-b.log") for n in names) and not any(n.endswith("/logs/node-a.log") for n in names)
    manifests = sorted(n.rsplit("/", 1)[1] for n in names if "/artifacts/manifest" in n)
    assert manifests == ["manifest.node-b.yaml", "manifest.yaml"]
    assert sum("/artifacts/objects/" in n and n.endswith(".expa") for n in names) == WORLD
    assert not any("/.wal/" in n or "/.delivery/" in n for n in names), "nothing private goes up"
    owner = [n for n in names if n.endswith("/owner")]
    assert len(owner) == 1 and run._files.read_text(run.path / "owner").strip() == "node-a"  # rank 0's collector
    for name in ("node-a", "node-b"):
        assert hosts.stop(name) == 0, hosts.log(name)
    # Once finished and stopped: one part per writer (the final merge), the narrower ones retired.
    parts = [n for n in bucket_files(bucket) if "/metrics/" in n]
    assert sorted(p.rsplit(".", 2)[1] for p in parts) == ["node-a", "node-b"], parts
    assert_every_point_once(expman.open_run(run.location))


def test_a_bucket_outage_mid_run_loses_and_doubles_nothing(hosts, bucket, tmp_path, s3_server):
    """moto is stopped (SIGSTOP) for 10 s while the ranks log their second half and finish,
    then continued (SIGCONT): the collectors keep acknowledging into staging, then catch up."""
    endpoints, host_names = two_hosts(hosts)
    gate = tmp_path / "go"
    ranks = launch_ranks(tmp_path, endpoints, host_names, gate)
    wait_for(lambda: all((tmp_path / f"half-{r}").exists() for r in range(WORLD)), 60, "every rank at half way")
    wait_for(lambda: any("/metrics/part-" in n for n in bucket_files(bucket)), 30, "the first parts in the bucket")
    wait_for(lambda: expman.list_runs(bucket), 30, "run.yaml in the bucket")
    live = expman.open_run(expman.list_runs(bucket)[0].location)  # a live run, read up to its last upload
    assert live.status == "running"
    table = live.metrics("loss")
    for rank in range(WORLD):
        steps = table.filter(table["rank"].to_numpy() == rank)["step"].to_pylist()
        assert len(steps) == len(set(steps)) and set(steps) <= set(range(POINTS // 2)), rank
    os.kill(s3_server.proc.pid, signal.SIGSTOP)
    try:
        gate.touch()
        wait_ranks(ranks)  # the ranks finish while the bucket is away
        wait_for(lambda: all("upload failed" in hosts.log(n) for n in ("node-a", "node-b")), 60,
                 "both collectors to notice the outage")
        time.sleep(10)  # keep the outage going (the assertions below do not depend on its length)
    finally:
        os.kill(s3_server.proc.pid, signal.SIGCONT)
    run = finished_run(bucket, hosts)
    assert_every_point_once(run)
    for name in ("node-a", "node-b"):
        assert hosts.stop(name) == 0, hosts.log(name)
        assert "uploads resumed" in hosts.log(name)
    assert_every_point_once(expman.open_run(run.location))


def test_a_collector_killed_mid_upload_finishes_its_uploads_after_a_restart(hosts, bucket, tmp_path, s3_server):
    """node-b is killed (-9) while an upload is in flight (moto is stopped, so the request
    cannot finish), then started again on the same staging folder and socket."""
    endpoints, host_names = two_hosts(hosts)
    gate = tmp_path / "go"
    ranks = launch_ranks(tmp_path, endpoints, host_names, gate)
    wait_for(lambda: all((tmp_path / f"half-{r}").exists() for r in range(WORLD)), 60, "every rank at half way")
    wait_for(lambda: any(n.endswith(".node-b.parquet") for n in bucket_files(bucket)), 30, "node-b's first part")
    uploaded = {n.rsplit("/", 1)[1] for n in bucket_files(bucket)}
    os.kill(s3_server.proc.pid, signal.SIGSTOP)
    try:
        gate.touch()
        staged = tmp_path / "state-node-b" / "staging"
        wait_for(lambda: {p.name for p in staged.glob("*/*/metrics/part-*.parquet")} - uploaded, 60, "a new part on node-b")
        time.sleep(1.0)  # the mirror's next pass (every 0.3 s) is now stuck in a request to the stopped server
        hosts.procs["node-b"].kill()
        hosts.procs.pop("node-b").wait()
    finally:
        os.kill(s3_server.proc.pid, signal.SIGCONT)
    hosts.start("node-b")  # same staging folder, same socket: its ranks resend what it did not acknowledge
    wait_ranks(ranks)
    run = finished_run(bucket, hosts)
    assert_every_point_once(run)
    for name in ("node-a", "node-b"):
        assert hosts.stop(name) == 0, hosts.log(name)
    assert_every_point_once(expman.open_run(run.location))


def test_duckdb_and_polars_read_a_run_from_the_bucket(hosts, bucket, tmp_path):
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.dataset as ds

    endpoints, host_names = two_hosts(hosts)
    wait_ranks(launch_ranks(tmp_path, endpoints, host_names))
    run = finished_run(bucket, hosts)
    for name in ("node-a", "node-b"):
        assert hosts.stop(name) == 0
    by_rank = pl.scan_parquet(f"{run.location}/metrics/*.parquet").group_by("rank").agg(
        pl.len().alias("points"), pl.col("step").n_unique().alias("steps")).sort("rank").collect()
    assert by_rank.rows() == [(r, POINTS, POINTS) for r in range(WORLD)]
    files, path = expman._storage.files.locate(run.location)  # type: ignore[attr-defined]
    parts = [f"{path}/metrics/{n}" for n in files.names(path / "metrics") if n.endswith(".parquet")]
    points = ds.dataset(parts, filesystem=files.filesystem, format="parquet")  # noqa: F841 - DuckDB finds it by name
    rows = duckdb.sql("select rank, count(*), count(distinct step), max(step) from points group by rank order by rank").fetchall()
    assert rows == [(r, POINTS, POINTS, POINTS - 1) for r in range(WORLD)]


def test_covered_parts_are_those_inside_a_wider_part_of_the_same_writer():
    names = ["part-0-00000000-00000000.a.parquet", "part-0-00000001-00000001.a.parquet",
             "part-1-00000000-00000001.a.parquet", "part-0-00000000-00000000.b.parquet", "notes.txt"]
    assert covered_parts(names) == names[:2]


def test_start_experiment_in_local_mode_logs_into_the_bucket(bucket, tmp_path, run_script):
    result = run_script(f"""
        import expman
        import time
        with expman.start_experiment("local", "solo", root={bucket!r}, log_hardware=True, hardware_interval=0.1) as exp:
            exp.log_parameters({{"lr": 0.5}})
            for step in range(300):
                exp.log_metric("loss", 1.0 / (step + 1), step=step)
            time.sleep(0.5)  # a few hardware samples
            print(exp.run_dir)
    """, env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert result.returncode == 0, result.stderr
    staged = Path(result.stdout.strip().splitlines()[-1])
    assert staged.is_relative_to(tmp_path / "state" / "expman" / "staging")
    (run,) = expman.list_runs(bucket)
    assert run.status == "finished" and run.params == {"lr": 0.5} and run.info["name"] == "solo"
    assert run.metrics("loss")["step"].to_pylist() == list(range(300))
    assert run.hardware().num_rows > 0 and any("/hardware/part-" in n for n in bucket_files(bucket))


def test_the_bucket_settings_read_from_a_config_file_are_checked(tmp_path):
    from expman.collector._daemon import load_config

    good = tmp_path / "good.yaml"
    good.write_text("root: s3://bucket/prefix\nstaging_dir: /var/lib/expman/staging\nupload_interval: 2.5\n"
                    "upload_batch_bytes: 1048576\n")
    assert load_config(str(good))["upload_interval"] == 2.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("upload_interval: -1\n")
    with pytest.raises(SystemExit, match="upload_interval"):
        load_config(str(bad))


def test_the_commit_rule_ends_a_rank_after_its_parts_and_retires_parts_after_their_wider_one(bucket, tmp_path):
    """The mirror alone, on a hand-made staged run: the hosts file that says a rank ended waits
    while the write-ahead log holds rows; a covered part leaves the bucket only after the grace."""
    from expman._storage.layout import part_name, write_yaml_atomic

    staging = tmp_path / "staging"
    run = staging / "e" / "r-1"
    hosts = run / "hosts" / "w.yaml"
    write_yaml_atomic(hosts, {"writer": "w", "ranks": {0: {"status": "running"}}})
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / part_name(0, 0, 0, "w")).write_bytes(b"first")
    wal = run / ".wal" / "w" / "00000001.wal"
    wal.parent.mkdir(parents=True)
    wal.write_bytes(b"rows not in a part yet")
    mirror = BucketMirror(bucket, staging, "w")
    files, root = expman._storage.files.locate(f"{bucket}/e/r-1")  # type: ignore[attr-defined]

    def remote_status() -> str:
        return yaml.safe_load(files.read_text(root / "hosts" / "w.yaml"))["ranks"][0]["status"]

    assert mirror.upload_pass(force=True)
    assert remote_status() == "running"
    assert bucket_files(bucket) == ["e/r-1/hosts/w.yaml", "e/r-1/metrics/part-0-00000000-00000000.w.parquet", "e/r-1/owner"]
    write_yaml_atomic(hosts, {"writer": "w", "ranks": {0: {"status": "finished"}}})
    assert not mirror.upload_pass(force=True)  # the rank's last rows are still in the WAL
    assert remote_status() == "running"
    (run / "metrics" / part_name(0, 1, 1, "w")).write_bytes(b"second")  # the collector's flush: a part, the WAL emptied
    wal.unlink()
    assert mirror.upload_pass(force=True)
    assert remote_status() == "finished"

    (run / "metrics" / part_name(1, 0, 1, "w")).write_bytes(b"merged")  # a merge: the wider part, then the inputs go
    for first in (0, 1):
        (run / "metrics" / part_name(0, first, first, "w")).unlink()
    assert not mirror.upload_pass(force=True)  # the inputs stay for readers that listed them
    assert len([n for n in bucket_files(bucket) if "/metrics/" in n]) == 3
    mirror.retire_after = 0.0
    assert mirror.upload_pass(force=True)
    assert [n for n in bucket_files(bucket) if "/metrics/" in n] == ["e/r-1/metrics/part-1-00000000-00000001.w.parquet"]
    assert mirror.requests["delete"] == 2 and not mirror.failures


def test_a_big_log_is_rewritten_in_the_bucket_less_often_than_it_grows(bucket, tmp_path):
    """A run.log past 1 MiB goes up at most every interval x (size / 1 MiB): bounded bandwidth."""
    from expman._storage.layout import write_yaml_atomic

    staging = tmp_path / "staging"
    run = staging / "e" / "r-1"
    write_yaml_atomic(run / "hosts" / "w.yaml", {"writer": "w", "ranks": {0: {"status": "running"}}})
    log = run / "run.log"
    log.write_bytes(b"line\n" * (1 << 19))  # 2.5 MiB
    mirror = BucketMirror(bucket, staging, "w", interval=60.0)
    files, root = expman._storage.files.locate(f"{bucket}/e/r-1")  # type: ignore[attr-defined]
    assert mirror.upload_pass(force=True) and len(files.read_bytes(root / "run.log")) == log.stat().st_size
    with open(log, "ab") as fh:
        fh.write(b"one more line\n")
    assert not mirror.upload_pass(force=True)  # it waits: at most every 60 s x 2.5 here
    assert len(files.read_bytes(root / "run.log")) == log.stat().st_size - 14
    mirror.interval = 0.0
    assert mirror.upload_pass(force=True)
    assert files.read_bytes(root / "run.log").endswith(b"one more line\n")


def bucket_state(uri: str) -> dict[str, tuple[int, float]]:
    """Every object under the root: size and last-modified time (a rewrite of the same bytes shows)."""
    files, path = expman._storage.files.locate(uri)  # type: ignore[attr-defined]
    infos = files.filesystem.get_file_info(pafs.FileSelector(str(path), recursive=True, allow_not_found=True))
    return {i.path: (i.size, i.mtime.timestamp()) for i in infos if i.type == pafs.FileType.File}


def test_a_finished_run_all_in_the_bucket_leaves_staging_and_late_frames_change_nothing(hosts, bucket, tmp_path):
    """The staging folder goes once the run is finished, closed (--forget-after) and all up; a
    late resend is a duplicate, a late hello or new frame is refused, before and after a
    restart; the bucket's run stays whole and untouched."""
    endpoint = hosts.start("node-a", "--forget-after", "0.5")
    staging = tmp_path / "state-node-a" / "staging"
    peer = Peer(endpoint, run="late-1", host="node-a")
    try:
        hello = peer.hello(name="late")
        points = [peer.send(proto.METRICS, metrics_body(list(range(i, i + 100)))) for i in range(0, 1000, 100)]
        finish = peer.send(proto.FINISH, {"status": "finished", "ended_at": time.time(), "last_step": 999})
        assert not any("rejected" in a for a in peer.wait([hello, *points, finish], 60).values())
        wait_for(lambda: list(staging.glob("e/*.uploaded")) and not list(staging.glob("*/*/")), 60,
                 "the staging folder to be replaced by its tombstone")
        assert [p.name for p in staging.iterdir()] == ["e"]
        (tomb,) = (staging / "e").iterdir()
        assert tomb.is_file()
        assert tomb.stat().st_size < 1024, tomb.read_text()  # a tombstone, not a copy
        (run,) = expman.list_runs(bucket)
        assert run.status == "finished" and yaml.safe_load(tomb.read_text())["location"] == run.location
        assert sorted(run.metrics("loss")["step"].to_pylist()) == list(range(1000))  # every point once
        uploaded = bucket_state(bucket)

        def late(p: Peer) -> None:
            peer.answers.clear()
            resent = p.send(proto.METRICS, metrics_body([0]), seq=points[3])
            again = p.hello(name="late")
            more = p.send(proto.METRICS, metrics_body([5000]))
            answers = p.wait([resent, again, more], 60)
            assert answers[resent] == {}, answers  # known (sender, seq): answered as a duplicate
            assert f"run late-1 is finished and uploaded to {run.location}" in answers[again]["rejected"], answers
            assert "is finished and uploaded" in answers[more]["rejected"], answers
            assert sorted(p.name for p in (staging / "e").iterdir()) == [tomb.name], "no run recreated in staging"

        late(peer)
        assert hosts.stop("node-a") == 0, hosts.log("node-a")
        peer.close()
        peer = Peer(hosts.start("node-a", "--forget-after", "0.5"), sender=peer.sender, run="late-1", host="node-a")
        peer.next_seq = finish + 10
        late(peer)
        assert hosts.stop("node-a") == 0, hosts.log("node-a")
    finally:
        peer.close()
    assert bucket_state(bucket) == uploaded, "the bucket is as the mirror left it: nothing re-uploaded or deleted"
    (run,) = expman.list_runs(bucket)
    assert run.status == "finished" and sorted(run.metrics("loss")["step"].to_pylist()) == list(range(1000))
    assert "Traceback" not in hosts.log("node-a")


def test_a_released_run_is_not_staged_again_even_after_a_kill_mid_removal(bucket, tmp_path):
    """The mirror alone: release() needs the run ended and all up; a folder left beside its
    tombstone (a kill between the two) is removed at the next start, and nothing goes up."""
    from expman._storage.layout import part_name, write_yaml_atomic

    staging = tmp_path / "staging"
    run = staging / "e" / "r-1"

    def stage() -> None:
        write_yaml_atomic(run / "hosts" / "w.yaml", {"writer": "w", "ranks": {0: {"status": "finished"}}})
        write_yaml_atomic(run / "run.yaml", {"id": "r1", "status": "running", "ranks": {0: {"status": "finished"}}})
        (run / "metrics").mkdir(parents=True, exist_ok=True)
        (run / "metrics" / part_name(0, 0, 0, "w")).write_bytes(b"points")

    stage()
    mirror = BucketMirror(bucket, staging, "w")
    assert mirror.upload_pass(force=True)
    assert mirror.release(run) is None and run.exists()  # not ended
    write_yaml_atomic(run / "run.yaml", {"id": "r1", "status": "finished", "ranks": {0: {"status": "finished"}}})
    assert mirror.release(run) is None and run.exists()  # ended, but that run.yaml is not up yet
    assert mirror.upload_pass(force=True)
    uploaded = bucket_state(bucket)
    record = mirror.release(run)
    assert record is not None and record["id"] == "r1" and record["location"] == f"{bucket}/e/r-1"
    assert not run.exists() and (staging / "e" / "r-1.uploaded").is_file() and bucket_state(bucket) == uploaded
    assert mirror.upload_pass(force=True) and bucket_state(bucket) == uploaded

    stage()  # as if a kill came after the tombstone and before the folder went
    again = BucketMirror(bucket, staging, "w")
    assert [r["id"] for r in again.released()] == ["r1"] and not run.exists()
    assert again.ended() == {} and again.upload_pass(force=True)
    assert again.requests["put"] == 0 and bucket_state(bucket) == uploaded


def test_a_run_closed_by_a_stopped_collector_leaves_staging_after_the_next_start(hosts, bucket, tmp_path):
    """The collector stops before it forgets the run (default delay): the folder stays; the
    next collector on that staging folder removes it once all of it is up."""
    peer = Peer(hosts.start("node-a"), run="stop-1", host="node-a")
    staging = tmp_path / "state-node-a" / "staging"
    try:
        seqs = [peer.hello(name="stop"), peer.send(proto.METRICS, metrics_body(list(range(500)))),
                peer.send(proto.FINISH, {"status": "finished", "ended_at": time.time(), "last_step": 499})]
        assert not any("rejected" in a for a in peer.wait(seqs, 60).values())
        finished_run(bucket, hosts)
        assert hosts.stop("node-a") == 0, hosts.log("node-a")
        (staged,) = staging.glob("e/*/")
        assert (staged / "run.yaml").exists(), "stopped before the run was forgotten: still staged"
        hosts.start("node-a")
        wait_for(lambda: not staged.exists(), 60, "the staging folder to go after the restart")
        assert (staging / "e" / f"{staged.name}.uploaded").is_file()
    finally:
        peer.close()
    (run,) = expman.list_runs(bucket)
    assert run.status == "finished" and sorted(run.metrics("loss")["step"].to_pylist()) == list(range(500))
