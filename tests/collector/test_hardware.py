"""Hardware sampling by the collector: real collector processes, real rank processes, real
files, and a fake NVML (tests/fake_nvml.py) standing in for GPUs this machine lacks."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.compute as pc
import yaml
import zmq

import expman
from expman._wire import frames as proto
from _helpers import wait_for
from conftest import start_collector

FAKE_NVML = str(Path(__file__).resolve().parents[1] / "fake_nvml.py")

HOST_KEYS = {
    "cpu.percent", "cpu.core.percent", "load.1m", "load.5m", "load.15m",
    "memory.total_bytes", "memory.used_bytes", "memory.available_bytes", "memory.percent",
    "swap.total_bytes", "swap.used_bytes", "swap.percent",
    "disk.read_bytes_per_s", "disk.write_bytes_per_s",
    "disk.root.total_bytes", "disk.root.used_bytes", "disk.root.free_bytes", "disk.root.percent",
    "net.rx_bytes_per_s", "net.tx_bytes_per_s", "net.total.rx_bytes_per_s", "net.total.tx_bytes_per_s",
}
PROCESS_KEYS = {"process.cpu_percent", "process.rss_bytes", "process.threads", "process.open_fds"}
GPU_KEYS = {
    "gpu.utilization.gpu_percent", "gpu.utilization.memory_percent", "gpu.memory.used_bytes", "gpu.memory.total_bytes",
    "gpu.power.draw_w", "gpu.power.limit_w", "gpu.temperature_c", "gpu.clock.sm_mhz", "gpu.clock.memory_mhz",
    "gpu.fan_percent", "gpu.pcie.rx_bytes_per_s", "gpu.pcie.tx_bytes_per_s", "gpu.throttle_reasons",
    "gpu.ecc.volatile.corrected", "gpu.ecc.volatile.uncorrected",
}
GPU_INFO_KEYS = {"gpu.count", "gpu.index", "gpu.name", "gpu.bus_id"}


def uuid(index: int) -> str:
    return f"GPU-{index:08x}-fake-4000-8000-{index:012d}"  # as fake_nvml.gpu() names them


def rows(table, **where) -> list[dict]:
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


def seconds(ts: dt.datetime) -> float:
    return ts.timestamp()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


RANK = """
import os, sys, expman
exp = expman.start_experiment("hw", "job", root={root!r}, collector={endpoint!r}, rank={rank}, world_size=2,
                              experiment_uid={uid!r}, log_hardware=True, hardware_interval=0.2)
print(os.getpid(), flush=True)
sys.stdin.readline()
exp.log_metric("loss", 0.5, step=1)
print(exp.finish(timeout=20), exp.run_dir, flush=True)
"""


def test_two_ranks_with_fake_gpus_are_sampled_attributed_and_survive_a_lost_gpu(root, short_dir, tmp_path, monkeypatch):
    config = tmp_path / "gpus.json"
    lost_flag = tmp_path / "lose-gpu-2"
    gpus = [{}, {}, {"lost_if_exists": str(lost_flag)}]
    write_json(config, {"gpus": gpus})
    monkeypatch.setenv("EXPMAN_NVML_MODULE", FAKE_NVML)
    monkeypatch.setenv("EXPMAN_FAKE_NVML", str(config))
    c = start_collector(root, short_dir)
    ranks = []
    try:
        for rank, extra_env in ((0, {"LOCAL_RANK": "0"}), (1, {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "2"})):
            env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LOCAL_RANK")}
            script = tmp_path / f"rank{rank}.py"
            script.write_text(RANK.format(root=str(root), endpoint=c.endpoint, rank=rank, uid="4a4d0000"))
            ranks.append(subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env={**env, **extra_env}))
        pid0, pid1 = (int(p.stdout.readline()) for p in ranks)
        run_dir = wait_for(lambda: next(root.glob("hw/job-4a4d0000/run.yaml"), None), 10, "the run directory").parent
        run = expman.open_run(run_dir)
        wait_for(lambda: rows(run.hardware("gpu.temperature_c"), device=uuid(0), rank=0), 10, "rank 0 on GPU 0")
        # Rank 0's process shows up on GPU 1 (NVML lists it); a stranger's process sits on GPU 0.
        gpus[1]["processes"] = [{"pid": pid0, "memory": 5 * 2**30}]
        gpus[0]["processes"] = [{"pid": 1, "memory": 2**30}]
        write_json(config, {"gpus": gpus})
        wait_for(lambda: rows(run.hardware("gpu.process.memory_used_bytes"), rank=0), 10, "rank 0's GPU memory")
        lost_flag.touch()
        wait_for(lambda: "is lost" in c.log(), 10, "the lost GPU to be reported")
        time.sleep(0.5)  # the other GPUs keep being sampled meanwhile
        started_finish = time.time()
        for p in ranks:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=30) for p in ranks]
        for p, (out, err) in zip(ranks, outputs):
            assert p.returncode == 0 and out.splitlines()[-1].startswith("True"), err
        wait_for(lambda: "hardware sampling stopped" in c.log(), 10, "sampling to stop")
        table = run.hardware()
        parts = sorted(p.name for p in (run.path / "hardware").iterdir())
        time.sleep(0.5)
        assert sorted(p.name for p in (run.path / "hardware").iterdir()) == parts, "nothing is written after the end"
        assert run.hardware().num_rows == table.num_rows
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert c.stop() == 0, c.log()

    assert len(parts) == 1, "one part per host once the run's sampling ended"
    keys = set(table["key"].to_pylist())
    assert HOST_KEYS | PROCESS_KEYS | GPU_KEYS | GPU_INFO_KEYS | {"gpu.process.memory_used_bytes", "gpu.lost"} <= keys
    assert set(table["host"].to_pylist()) == {run.info["ranks"][0]["host"]}
    times = sorted(set(seconds(t) for t in table["time"].to_pylist()))

    # The first sample comes at once, the last one at the end; about every 0.2 s between.
    info = run.info
    started = dt.datetime.fromisoformat(info["started_at"]).timestamp()
    assert times[0] - started < 2.0
    assert times[-1] >= started_finish
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sorted(gaps)[len(gaps) // 2] < 0.5

    # Process series, one per rank.
    for key in PROCESS_KEYS:
        assert {r["rank"] for r in rows(table, key=key)} == {0, 1}, key
    assert all(r["device"] is None for r in rows(table, key="process.rss_bytes"))
    assert all(r["value"] > 1e6 for r in rows(table, key="process.rss_bytes"))
    # Host series: no rank; cores and interfaces as devices.
    assert {r["rank"] for r in rows(table, key="memory.total_bytes")} == {None}
    assert {r["device"] for r in rows(table, key="cpu.core.percent")} == {f"cpu{i}" for i in range(os.cpu_count())}
    assert "lo" in {r["device"] for r in rows(table, key="net.rx_bytes_per_s")}

    # GPUs: keyed by UUID, described once, attributed to ranks.
    assert {r["device"] for r in rows(table, key="gpu.name")} == {uuid(0), uuid(1), uuid(2)}
    assert {r["text"] for r in rows(table, key="gpu.bus_id")} == {"00000000:18:00.0", "00000000:19:00.0", "00000000:1A:00.0"}
    util = rows(table, key="gpu.utilization.gpu_percent")
    last = max(r["time"] for r in util if seconds(r["time"]) < started_finish)  # both ranks still running
    before_end = {(r["device"], r["rank"]) for r in util if r["time"] == last}
    assert before_end == {(uuid(0), None), (uuid(1), 0)}, "rank 0 by its process on GPU 1; GPU 0 is nobody's"
    assert (uuid(2), 1) in {(r["device"], r["rank"]) for r in util}, "rank 1 by CUDA_VISIBLE_DEVICES=2"
    assert (uuid(0), 0) in {(r["device"], r["rank"]) for r in util}, \
        "before its process shows up on a GPU, rank 0 gets the one at its LOCAL_RANK"
    memory = rows(table, key="gpu.process.memory_used_bytes")
    assert {(r["device"], r["rank"], r["value"]) for r in memory} == {(uuid(1), 0, 5.0 * 2**30)}, "never a stranger's process"

    # The lost GPU: reported once, never sampled again; the others carry on.
    (lost,) = rows(table, key="gpu.lost")
    assert lost["device"] == uuid(2) and lost["rank"] == 1 and lost["value"] == 1.0
    assert not [r for r in table.to_pylist() if r["device"] == uuid(2) and r["time"] > lost["time"]]
    after = {r["device"] for r in util if r["time"] > lost["time"]}
    assert after == {uuid(0), uuid(1)}
    assert c.log().count(f"GPU 2 ({uuid(2)}) is lost") == 1


def test_without_nvml_host_and_process_only_intervals_and_start_stop(root, short_dir, tmp_path, monkeypatch):
    config = tmp_path / "no-driver.json"
    write_json(config, {"init_error": 12})  # NVML_ERROR_LIBRARY_NOT_FOUND, as on a machine without a driver
    monkeypatch.setenv("EXPMAN_NVML_MODULE", FAKE_NVML)
    monkeypatch.setenv("EXPMAN_FAKE_NVML", str(config))
    collector_config = tmp_path / "collector.yaml"
    collector_config.write_text(yaml.safe_dump({"hardware_interval": 0.25}))
    # Also on tcp, so ranks of other hosts could reach it: then a rank must name this host.
    c = start_collector(root, short_dir, None, "--config", str(collector_config), "--bind", "tcp://127.0.0.1:0")
    try:
        common = dict(root=root, collector=c.endpoint)
        default = expman.start_experiment("hw", "default-interval", log_hardware=True, **common)
        slow = expman.start_experiment("hw", "slow", log_hardware=True, hardware_interval=30, **common)
        plain = expman.start_experiment("hw", "plain", **common)
        # A rank on another host asks too: its own host's collector samples it, not this one.
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(c.endpoint)
        sock.send(proto.encode_frame("hello", run="e15e0000", host="elsewhere", rank=0, sender="s", seq=0, sent_at=time.time(),
                                     body={"experiment": "hw", "name": "remote", "dir": "remote-e15e0000",
                                           "pid": os.getpid(), "log_hardware": True}))
        assert sock.poll(5000)
        sock.close()
        wait_for(lambda: "hardware sampling started" in c.log(), 10, "sampling to start")
        time.sleep(1.2)
        for exp in (default, slow, plain):
            assert exp.finish(timeout=10)
        wait_for(lambda: "hardware sampling stopped" in c.log(), 10, "sampling to stop")
        # A later run starts a new sampling session.
        with expman.start_experiment("hw", "again", log_hardware=True, hardware_interval=0.2, **common) as again:
            wait_for(lambda: c.log().count("hardware sampling started") == 2, 10, "sampling to start again")
        wait_for(lambda: c.log().count("hardware sampling stopped") == 2, 10, "sampling to stop again")
    finally:
        assert c.stop() == 0, c.log()
    log_text = c.log()
    assert log_text.count("without GPU metrics") == 1, "one clear line, once"
    assert "NVML Shared Library Not Found" in log_text
    assert "runs on elsewhere" in log_text

    table = expman.open_run(default.run_dir).hardware()
    keys = set(table["key"].to_pylist())
    assert HOST_KEYS | PROCESS_KEYS <= keys
    assert not {k for k in keys if k.startswith("gpu.")} - {"gpu.count"}
    (count,) = rows(table, key="gpu.count")
    assert count["value"] == 0 and "Library Not Found" in count["text"]
    assert {r["rank"] for r in rows(table, key="process.rss_bytes")} == {0}
    times = sorted(set(seconds(t) for t in table["time"].to_pylist()))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) >= 4 and 0.2 <= sorted(gaps)[len(gaps) // 2] <= 0.35, gaps  # the collector's 0.25 s

    slow_times = set(expman.open_run(slow.run_dir).hardware()["time"].to_pylist())
    assert len(slow_times) == 2, "the first sample at once, the last one at finish"
    assert expman.open_run(again.run_dir).hardware().num_rows > 0
    assert not (expman.open_run(plain.run_dir).path / "hardware").exists()
    assert not (root / "hw" / "remote-e15e0000" / "hardware").exists()


def test_local_mode_script_with_log_hardware(root, run_script, tmp_path):
    config = tmp_path / "one-gpu.json"
    write_json(config, {"gpus": [{"fan": None}]})  # a passively cooled card: no fan reading
    result = run_script(f"""
        import expman
        with expman.start_experiment("hw", "local", root={str(root)!r}, log_hardware=True, hardware_interval=0.2) as exp:
            for step in range(100):
                exp.log_metric("loss", 1.0 / (step + 1), step=step)
        print(exp.run_dir)
    """, env={"EXPMAN_NVML_MODULE": FAKE_NVML, "EXPMAN_FAKE_NVML": str(config), "LOCAL_RANK": "0"}, check=True)
    run = expman.open_run(result.stdout.strip())
    assert run.status == "finished" and run.metrics().num_rows == 100
    table = run.hardware()
    keys = set(table["key"].to_pylist())
    assert (HOST_KEYS | PROCESS_KEYS | GPU_KEYS) - {"gpu.fan_percent"} <= keys and "gpu.fan_percent" not in keys
    assert {r["rank"] for r in rows(table, key="gpu.temperature_c")} == {0}
    assert "not implemented" not in result.stderr
    # Plain tools read it without expman.
    import duckdb

    pattern = str(run.path / "hardware" / "*.parquet")
    ((n,),) = duckdb.sql(f"select count(*) from read_parquet('{pattern}') where key = 'gpu.temperature_c'").fetchall()
    assert n == pc.sum(pc.equal(table["key"].cast("string"), "gpu.temperature_c")).as_py() > 0


def test_two_hosts_sharing_a_root_each_sample_their_own_ranks(root, short_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPMAN_NVML_MODULE", FAKE_NVML)
    collectors, ranks = [], []
    try:
        for host in ("node-a", "node-b"):
            config = tmp_path / f"{host}.json"
            write_json(config, {"gpus": [{"uuid": f"GPU-{host}-{i}"} for i in range(2)]})
            monkeypatch.setenv("EXPMAN_FAKE_NVML", str(config))
            monkeypatch.setenv("EXPMAN_HOST", host)
            workdir = short_dir / host
            workdir.mkdir()
            collectors.append(start_collector(root, workdir, None, "--name", host))
        script = tmp_path / "rank.py"
        script.write_text(textwrap.dedent("""
            import time, expman
            with expman.start_experiment("hw", "multi", log_hardware=True, hardware_interval=0.2) as exp:
                exp.log_metric("loss", 1.0, step=0)
                time.sleep(0.8)
        """))
        for rank, (host, c) in enumerate(zip(("node-a", "node-b"), collectors)):
            env = {**os.environ, "EXPMAN_RUN_ID": "hw-multi", "EXPMAN_RANK": str(rank), "EXPMAN_WORLD_SIZE": "2",
                   "EXPMAN_COLLECTOR": c.endpoint, "EXPMAN_HOST": host}
            env.pop("EXPMAN_FAKE_NVML")
            ranks.append(subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True))
        for p in ranks:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        for c in collectors:
            wait_for(lambda: "hardware sampling stopped" in c.log(), 10, "sampling to stop")
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
        for c in collectors:
            assert c.stop() == 0, c.log()
    (run,) = expman.list_runs(root)
    writers = {p.name.split(".")[-2] for p in (run.path / "hardware").glob("*.parquet")}
    assert writers == {"node-a", "node-b"}, "each host's collector writes its own parts"
    table = run.hardware()
    assert set(table["host"].to_pylist()) == {"node-a", "node-b"}
    assert {(r["host"], r["rank"]) for r in rows(table, key="process.rss_bytes")} == {("node-a", 0), ("node-b", 1)}
    temps = {(r["host"], r["device"], r["rank"]) for r in rows(table, key="gpu.temperature_c")}
    assert temps == {("node-a", "GPU-node-a-0", 0), ("node-a", "GPU-node-a-1", None),
                     ("node-b", "GPU-node-b-0", 1), ("node-b", "GPU-node-b-1", None)}, "local rank 0 on each host"
