"""Several hosts on one machine: network namespaces joined by a veth pair (loopback
addresses when namespaces cannot be made), a head collector and a relay collector."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

import expman
from _helpers import wait_for

POINTS = 3000


@dataclass
class Host:
    name: str
    address: str
    prefix: list[str]  # command prefix that runs a program "on" this host

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix, *args], **kwargs)


def _ip(*args: str) -> bool:
    return subprocess.run(["ip", *args], capture_output=True).returncode == 0


@pytest.fixture
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Namespaces em-<tag>-a/b with 10.213.<n>.1/.2 on a veth pair, removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"em-{tag}-a", f"em-{tag}-b"
    net = f"10.213.{int(tag[:2], 16)}"
    made = []
    ok = os.geteuid() == 0 and _ip("netns", "add", a) and not made.append(a) and _ip("netns", "add", b)
    if ok:
        made.append(b)
        ok = (_ip("link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b")
              and _ip("link", "set", f"v{tag}a", "netns", a) and _ip("link", "set", f"v{tag}b", "netns", b)
              and _ip("-n", a, "addr", "add", f"{net}.1/30", "dev", f"v{tag}a")
              and _ip("-n", b, "addr", "add", f"{net}.2/30", "dev", f"v{tag}b")
              and all(_ip("-n", ns, "link", "set", dev, "up")
                      for ns, dev in ((a, f"v{tag}a"), (b, f"v{tag}b"), (a, "lo"), (b, "lo"))))
    try:
        if ok:
            yield (Host("node-a", f"{net}.1", ["ip", "netns", "exec", a]),
                   Host("node-b", f"{net}.2", ["ip", "netns", "exec", b]))
        else:  # no namespaces here: distinct loopback addresses stand in for the hosts
            yield Host("node-a", "127.0.0.2", []), Host("node-b", "127.0.0.3", [])
    finally:
        for ns in made:
            _ip("netns", "del", ns)


def start(host: Host, args: list[str], ready: Path, log: Path) -> tuple[subprocess.Popen, list[str]]:
    proc = host.popen([sys.executable, "-m", "expman.collector", "--ready-file", str(ready), *args],
                      stderr=open(log, "wb"), stdout=subprocess.DEVNULL)
    wait_for(lambda: ready.exists() or proc.poll() is not None, 20, f"collector on {host.name}")
    assert proc.poll() is None, log.read_text()
    return proc, yaml.safe_load(ready.read_text())["endpoints"]


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_relay_merges_two_hosts_into_one_run_with_every_point_once(two_hosts, short_dir, tmp_path, root):
    head_host, relay_host = two_hosts
    procs = []
    try:
        head, (head_ipc, head_tcp) = start(
            head_host, ["--root", str(root), "--bind", f"ipc://{short_dir}/a.sock", "--bind", f"tcp://{head_host.address}:0"],
            tmp_path / "head.ready", tmp_path / "head.log")
        procs.append(head)
        relay, (relay_ipc,) = start(
            relay_host, ["--root", str(tmp_path / "unused"), "--bind", f"ipc://{short_dir}/b.sock", "--forward", head_tcp],
            tmp_path / "relay.ready", tmp_path / "relay.log")
        procs.append(relay)
        script = tmp_path / "rank.py"
        script.write_text(textwrap.dedent(f"""
            import expman
            with expman.start_experiment("multi", "job") as exp:
                for step in range({POINTS}):
                    exp.log_metric("loss", float(step), step=step)
                exp.log_parameters({{"host_rank": exp.rank}})
        """))
        world = 4
        ranks = []
        for rank in range(world):
            host, endpoint = (head_host, head_ipc) if rank < 2 else (relay_host, relay_ipc)
            env = {**os.environ, "EXPMAN_RUN_ID": "multi-job", "EXPMAN_RANK": str(rank), "EXPMAN_WORLD_SIZE": str(world),
                   "EXPMAN_COLLECTOR": endpoint, "EXPMAN_HOST": host.name}
            ranks.append(host.popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True))
        for proc in ranks:
            _, proc.stderr_text = proc.communicate(timeout=90)
            assert proc.returncode == 0, proc.stderr_text
        (run,) = expman.list_runs(root)
        assert run.status == "finished", run.info
        assert run.info["started_at"] <= min(r["started_at"] for r in run.info["ranks"].values())
        assert sorted(run.info["hosts"]) == ["node-a", "node-b"]
        assert {r: v["host"] for r, v in run.info["ranks"].items()} == {0: "node-a", 1: "node-a", 2: "node-b", 3: "node-b"}
        table = run.metrics("loss")
        for rank in range(world):
            rows = table.filter(table["rank"].to_numpy() == rank)
            assert sorted(rows["step"].to_pylist()) == list(range(POINTS)), rank
            assert set(rows["host"].to_pylist()) == {"node-a" if rank < 2 else "node-b"}
        assert not (tmp_path / "unused").exists() or not any((tmp_path / "unused").iterdir()), "the relay writes nothing"
    finally:
        for proc in reversed(procs):
            assert stop(proc) == 0


def test_shared_filesystem_hosts_write_their_own_parts_and_the_reader_merges(two_hosts, short_dir, tmp_path, root):
    host_a, host_b = two_hosts
    procs = []
    try:
        a, (a_ipc,) = start(host_a, ["--root", str(root), "--name", host_a.name, "--bind", f"ipc://{short_dir}/a.sock"],
                            tmp_path / "a.ready", tmp_path / "a.log")
        procs.append(a)
        b, (b_ipc,) = start(host_b, ["--root", str(root), "--name", host_b.name, "--bind", f"ipc://{short_dir}/b.sock"],
                            tmp_path / "b.ready", tmp_path / "b.log")
        procs.append(b)
        script = tmp_path / "rank.py"
        script.write_text(textwrap.dedent(f"""
            import expman
            with expman.start_experiment("shared", "job") as exp:
                exp.log_parameters({{"lr": 0.1, "seed": exp.rank}})
                for step in range({POINTS}):
                    exp.log_metric("loss", float(step), step=step)
                exp.info(f"rank {{exp.rank}} says hi")
        """))
        world = 4
        ranks = []
        for rank in range(world):
            host, endpoint = (host_a, a_ipc) if rank % 2 == 0 else (host_b, b_ipc)
            env = {**os.environ, "EXPMAN_RUN_ID": "shared-job", "EXPMAN_RANK": str(rank),
                   "EXPMAN_WORLD_SIZE": str(world), "EXPMAN_COLLECTOR": endpoint, "EXPMAN_HOST": host.name}
            ranks.append(host.popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True))
        for proc in ranks:
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
        (run,) = expman.list_runs(root)
        wait_for(lambda: run.status == "finished", 10, "the owner to fold in the other host's ranks")
        info = run.info
        assert sorted(info["ranks"]) == list(range(world)) and sorted(info["hosts"]) == ["node-a", "node-b"]
        assert all(v["status"] == "finished" for v in info["ranks"].values())
        writers = {p.name.split(".")[-2] for p in (run.path / "metrics").glob("*.parquet")}
        assert writers == {"node-a", "node-b"}, "each host's collector writes its own parts"
        table = run.metrics("loss")
        for rank in range(world):
            assert sorted(table.filter(table["rank"].to_numpy() == rank)["step"].to_pylist()) == list(range(POINTS))
        assert run.params == {"lr": 0.1, "seed": 0}
        assert sorted(info["param_conflicts"]["seed"]) == list(range(world))
        text = run.log_text()
        assert all(f"rank {r} says hi" in text for r in range(world))
    finally:
        for proc in reversed(procs):
            assert stop(proc) == 0
