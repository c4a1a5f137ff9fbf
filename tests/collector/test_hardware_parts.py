"""The pieces of hardware sampling on canned data: sources, attribution, the sampler's
thread, and the Parquet parts of several hosts in one run directory."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

import expman
from expman._wire.frames import Frame
from expman._storage.layout import list_parts, part_name, write_yaml_atomic
from expman.collector._hardware import HardwareMonitor, HardwarePlan, Moment, RankTarget
from expman.collector._hardware_store import HardwareStore
from expman.collector._parts import MERGE_FANIN
from expman.collector.samplers import Reading
from expman.collector.samplers.gpu import DeviceInfo, GpuSource, GpuUnavailable, device_for_rank, visible_devices
from expman.collector.samplers.host import HostSource
from _helpers import wait_for
from fake_nvml import NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_UNKNOWN, FakeNvml, gpu

# --- the host source over a canned psutil -----------------------------------------------

CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


class CannedPsutil:
    def __init__(self) -> None:
        self.cores = [CpuTimes(10, 0, 0, 10, 0, 0, 0, 0, 0, 0), CpuTimes(0, 0, 0, 20, 0, 0, 0, 0, 0, 0)]
        self.disk = SimpleNamespace(read_bytes=1000, write_bytes=5000)
        self.nics = {"lo": (100, 100), "eth0": (1000, 2000)}

    def cpu_times(self, percpu: bool) -> list[CpuTimes]:
        return list(self.cores)

    def getloadavg(self) -> tuple[float, float, float]:
        return (1.5, 1.0, 0.5)

    def virtual_memory(self) -> SimpleNamespace:
        return SimpleNamespace(total=16e9, used=4e9, available=12e9, percent=25.0)

    def swap_memory(self) -> SimpleNamespace:
        return SimpleNamespace(total=2e9, used=1e9, percent=50.0)

    def disk_io_counters(self) -> SimpleNamespace:
        return self.disk

    def disk_usage(self, path: str) -> SimpleNamespace:
        return SimpleNamespace(total=100e9, used=40e9, free=60e9, percent=40.0)

    def net_io_counters(self, pernic: bool) -> dict[str, SimpleNamespace]:
        return {name: SimpleNamespace(bytes_recv=rx, bytes_sent=tx) for name, (rx, tx) in self.nics.items()}


def by_key(readings: list[Reading]) -> dict[tuple[str, str | None], float | None]:
    return {(r.key, r.device): r.value for r in readings}


def test_host_source_turns_counters_into_rates():
    ps, now = CannedPsutil(), [100.0]
    source = HostSource("/data", psutil=ps, clock=lambda: now[0])
    now[0] += 2.0
    ps.cores = [CpuTimes(11, 0, 0, 11, 0, 0, 0, 0, 0, 0), CpuTimes(0, 0, 0, 21, 1, 0, 0, 0, 0, 0)]  # 50 %; idle + iowait
    ps.disk = SimpleNamespace(read_bytes=3000, write_bytes=5000)
    ps.nics = {"lo": (1_000_100, 100), "eth0": (5000, 3000), "ib0": (7, 7)}
    got = by_key(source.sample())
    assert got[("cpu.core.percent", "cpu0")] == 50.0 and got[("cpu.core.percent", "cpu1")] == 0.0
    assert got[("cpu.percent", None)] == 25.0
    assert got[("load.1m", None)] == 1.5 and got[("memory.available_bytes", None)] == 12e9 and got[("swap.percent", None)] == 50
    assert got[("disk.read_bytes_per_s", None)] == 1000.0 and got[("disk.write_bytes_per_s", None)] == 0.0
    assert got[("disk.root.free_bytes", None)] == 60e9
    assert got[("net.rx_bytes_per_s", "eth0")] == 2000.0 and got[("net.tx_bytes_per_s", "eth0")] == 500.0
    assert got[("net.rx_bytes_per_s", "lo")] == 500_000.0
    assert got[("net.total.rx_bytes_per_s", None)] == 2000.0, "loopback is kept apart from the total"
    assert ("net.rx_bytes_per_s", "ib0") not in got, "a new interface gets a rate from its second sample"
    # A counter that goes down (a disk removed, a counter reset) gives no rate, not a negative one.
    now[0] += 1.0
    ps.disk = SimpleNamespace(read_bytes=10, write_bytes=10)
    got = by_key(source.sample())
    assert ("disk.read_bytes_per_s", None) not in got and got[("net.rx_bytes_per_s", "ib0")] == 0.0


def test_host_source_part_that_fails_is_logged_once_and_the_rest_sampled(caplog):
    ps = CannedPsutil()
    ps.swap_memory = lambda: (_ for _ in ()).throw(OSError("no /proc/vmstat"))
    source = HostSource("/", psutil=ps)
    with caplog.at_level(logging.WARNING, "expman.collector"):
        first, second = source.sample(), source.sample()
    assert ("load.1m", None) in by_key(first) and ("disk.root.percent", None) in by_key(second)
    assert sum("no /proc/vmstat" in r.message for r in caplog.records) == 1


# --- the GPU source over the fake NVML ----------------------------------------------------


def test_gpu_source_reads_every_device_and_degrades_per_call(caplog):
    nvml = FakeNvml([
        gpu(0, processes=[{"pid": 4242, "memory": 3 * 2**30}, {"pid": 999, "memory": 1}]),
        gpu(1, fan=None, ecc_corrected=None, ecc_uncorrected=None, errors={"nvmlDeviceGetTemperature": NVML_ERROR_UNKNOWN}),
        gpu(2, errors={"nvmlDeviceGetCurrentClocksEventReasons": NVML_ERROR_FUNCTION_NOT_FOUND}, throttle=4),
        gpu(3, processes=[{"pid": 4242, "memory": None}]),
    ])
    source = GpuSource(nvml)
    assert [d.index for d in source.devices] == [0, 1, 2, 3]
    assert source.devices[0] == DeviceInfo(0, gpu(0)["uuid"], gpu(0)["name"], "00000000:18:00.0")  # bytes decoded
    with caplog.at_level(logging.WARNING, "expman.collector"):
        samples = [source.sample({4242}) for _ in range(3)]
    got = by_key(samples[0])
    u = [gpu(i)["uuid"] for i in range(4)]
    assert got[("gpu.power.draw_w", u[0])] == 350.0 and got[("gpu.pcie.rx_bytes_per_s", u[0])] == 1000 * 1024
    assert got[("gpu.memory.total_bytes", u[1])] == 80 * 2**30
    assert ("gpu.fan_percent", u[1]) not in got and ("gpu.ecc.volatile.corrected", u[1]) not in got
    assert ("gpu.temperature_c", u[1]) not in got and got[("gpu.temperature_c", u[0])] == 60
    assert got[("gpu.throttle_reasons", u[2])] == 4, "drivers without clock event reasons: the older call"
    procs = [(r.device, r.pid, r.value) for r in samples[0] if r.key == "gpu.process.memory_used_bytes"]
    assert procs == [(u[0], 4242, 3.0 * 2**30), (u[3], 4242, None)], "only the pids asked for; None when NVML cannot tell"
    # Unsupported calls are not made again; failing ones are retried but logged once.
    assert nvml.calls["nvmlDeviceGetFanSpeed"] == 3 * 3 + 1  # GPU 1 asked once
    assert nvml.calls["nvmlDeviceGetTemperature"] == 4 * 3
    assert sum("reading temperature failed" in r.message for r in caplog.records) == 1


def test_gpu_lost_mid_run_is_reported_once_and_the_others_keep_sampling(caplog):
    nvml = FakeNvml([gpu(0), gpu(1), gpu(2)])
    source = GpuSource(nvml)
    assert len(source.sample()) == 3 * 15
    nvml.gpus[1]["lost"] = True
    with caplog.at_level(logging.WARNING, "expman.collector"):
        second, third = source.sample(), source.sample()
    assert [r for r in second if r.key == "gpu.lost"] == [Reading("gpu.lost", 1.0, gpu(1)["uuid"])]
    assert {r.device for r in third} == {gpu(0)["uuid"], gpu(2)["uuid"]} and len(third) == 2 * 15
    assert sum("is lost" in r.message for r in caplog.records) == 1
    source.close()
    assert nvml.initialized == 0


def test_gpu_source_without_nvml_or_gpus_says_why():
    with pytest.raises(GpuUnavailable, match="NVML Shared Library Not Found"):
        GpuSource(FakeNvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND))
    nvml = FakeNvml([])
    with pytest.raises(GpuUnavailable, match="found no GPU"):
        GpuSource(nvml)
    assert nvml.initialized == 0, "NVML is shut down again"
    # A GPU already lost at start is left out; the rest are sampled.
    source = GpuSource(FakeNvml([gpu(0, lost=True), gpu(1)]))
    assert [d.index for d in source.devices] == [1]


# --- which rank uses which device ---------------------------------------------------------

DEVICES = [DeviceInfo(i, f"GPU-{i}{i}{i}{i}aaaa-0000", f"gpu{i}", f"bus{i}") for i in range(4)]


@pytest.mark.parametrize("cvd, local_rank, expected", [
    (None, 0, 0), (None, 3, 3), (None, 4, None),            # all visible: the local rank picks
    ("2", 0, 2), ("2", 5, 2),                               # one visible: that one, whatever the local rank
    ("3,1", 1, 1), ("3, 1", 0, 3),                          # CUDA's order, spaces allowed
    ("GPU-1111", 0, 1), ("2222aaaa", 0, 2),                 # UUID prefixes, with or without GPU-
    ("0,7,1", 1, 0), ("1,1,2", 2, 1),                       # CUDA stops at an invalid or repeated entry
    ("", 0, None), ("-1", 0, None), ("MIG-abcd", 0, None),  # nothing visible, or MIG (not mapped)
])
def test_device_for_rank_follows_cuda_visible_devices(cvd, local_rank, expected):
    got = device_for_rank(cvd, local_rank, DEVICES)
    assert (got.index if got else None) == expected


def test_visible_devices_keeps_cuda_order():
    assert [d.index for d in visible_devices("3,0,2", DEVICES)] == [3, 0, 2]


@pytest.mark.parametrize("nvd, cvd, local_rank, expected", [
    ("GPU-3333,GPU-1111", None, 0, 1), ("GPU-3333,GPU-1111", None, 1, 3),  # a container's GPUs, NVML order
    ("2,3", "1", 0, 3),                          # CUDA_VISIBLE_DEVICES counts inside the container
    ("all", None, 2, 2), ("", None, 2, 2),       # every GPU
    ("none", None, 0, None), ("void", None, 0, None),
])
def test_device_for_rank_in_a_container(nvd, cvd, local_rank, expected):
    got = device_for_rank(cvd, local_rank, DEVICES, nvd)
    assert (got.index if got else None) == expected


def test_plan_attributes_devices_by_process_then_by_visible_devices(tmp_path):
    plan = HardwarePlan(1.0)
    for target in (RankTarget(0, 100, 0), RankTarget(1, 101, 1), RankTarget(2, 102, 2, "GPU-3333"), RankTarget(3, 103, 3, "")):
        plan.add("run", tmp_path, target, None, 0.0)
    u = [d.uuid for d in DEVICES]
    gpus = [Reading("gpu.temperature_c", 50.0 + i, u[i]) for i in range(4)] + [
        Reading("gpu.process.memory_used_bytes", 1.0, u[2], 100),   # rank 0 runs on GPU 2 (not GPU 0)
        Reading("gpu.process.memory_used_bytes", 2.0, u[2], 101),   # rank 1 shares it
        Reading("gpu.process.memory_used_bytes", 9.0, u[0], 555),   # someone else's process
    ]
    moment = Moment(host=[Reading("load.1m", 1.0)], processes=[Reading("process.threads", 8.0, None, 101),
                                                                   Reading("process.threads", 3.0, None, 555)],
                    gpus=gpus, devices=DEVICES, info=[Reading("gpu.name", None, u[0], None, "gpu0")])
    run = plan.runs["run"]
    assert plan.attribute(run, moment) == {u[2]: [0, 1], u[3]: [2]}
    rows = plan.rows(run, moment)
    temps = sorted((r[2], r[3]) for r in rows if r[0] == "gpu.temperature_c")
    assert temps == [(u[0], None), (u[1], None), (u[2], 0), (u[2], 1), (u[3], 2)], "a shared device: one row per rank"
    assert ("load.1m", 1.0, None, None, None) in rows
    assert [r for r in rows if r[0] == "process.threads"] == [("process.threads", 8.0, None, 1, None)]
    assert sorted(r[3] for r in rows if r[0] == "gpu.process.memory_used_bytes") == [0, 1]
    assert ("gpu.name", None, u[0], None, "gpu0") in rows, "devices are described in a run's first sample"
    assert plan.sampled(run, 0.1) is False and run.due == pytest.approx(1.1)
    assert not [r for r in plan.rows(run, moment) if r[0] == "gpu.name"], "and only then"
    plan.end("run", 0, 0.5)
    assert plan.due(0.5) == [run] and plan.sampled(run, 0.5) is False and sorted(run.ranks) == [1, 2, 3]
    for rank in (1, 2, 3):
        plan.end("run", rank, 0.6)
    assert plan.sampled(run, 0.6) is True and not plan.runs and plan.next_due() is None


# --- the sampler thread never holds up its caller ---------------------------------------------


class SlowNvml(FakeNvml):
    """NVML whose start waits until the test opens `gate` (nvmlInit can take seconds without
    persistence mode), and whose PCIe reads are slow as on real GPUs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.started = threading.Event()

    def nvmlInit(self) -> None:
        self.gate.wait(60)
        super().nvmlInit()
        self.started.set()

    def nvmlDeviceGetPcieThroughput(self, handle, counter):
        time.sleep(0.05)
        return super().nvmlDeviceGetPcieThroughput(handle, counter)


def hello(run: str, rank: int, host: str, **body) -> Frame:
    return Frame("hello", run, host, rank, "s", 0, time.time(), {"log_hardware": True, "pid": os.getpid(), **body})


def test_a_collector_on_ipc_only_samples_ranks_whatever_host_they_name(tmp_path):
    monitor = HardwareMonitor(tmp_path, nvml=FakeNvml([]), local_only=True)
    monitor.hello(hello("4", 0, "training-pod-7"), tmp_path)  # a container's host name
    assert ("4", 0) in monitor._registered
    monitor.close()
    remote = HardwareMonitor(tmp_path, nvml=FakeNvml([]))
    remote.hello(hello("4", 0, "training-pod-7"), tmp_path)
    assert not remote._registered and remote._thread is None


def test_monitor_calls_return_at_once_and_close_writes_the_last_sample(tmp_path):
    nvml = SlowNvml([gpu(0), gpu(1)])
    monitor = HardwareMonitor(tmp_path, nvml=nvml, flush_interval=0.1)
    run_dir = tmp_path / "e" / "r-1"
    run_dir.mkdir(parents=True)
    write_yaml_atomic(run_dir / "run.yaml", {"id": "1"})
    monitor.hello(hello("1", 0, monitor.host, hardware_interval=0.2), run_dir)
    monitor.hello(hello("1", 1, "another-host"), run_dir)  # not this host's to sample
    monitor.rank_ended("1", 5)  # never registered: nothing to do
    assert not nvml.started.is_set(), "NVML starts on the sampler's thread: the calls returned before it did"
    nvml.gate.set()
    run = expman.open_run(run_dir)
    wait_for(lambda: run.hardware("gpu.pcie.rx_bytes_per_s").num_rows >= 2, 10, "the first samples")
    t0 = time.perf_counter()
    monitor.close()
    assert time.perf_counter() - t0 < 30
    table = run.hardware()
    assert {r for r in table["rank"].to_pylist()} == {None, 0}
    assert len(list_parts(run_dir / "hardware")) == 1
    n = table.num_rows
    time.sleep(0.3)
    assert run.hardware().num_rows == n


# --- several hosts, one run directory ---------------------------------------------------------


def test_each_host_writes_its_own_parts_and_the_reader_merges_them(tmp_path):
    run_dir = tmp_path / "e" / "r-2"
    run_dir.mkdir(parents=True)
    write_yaml_atomic(run_dir / "run.yaml", {"id": "2"})
    a, b = HardwareStore(run_dir, "node-a.cluster", "node-a"), HardwareStore(run_dir, "node-b.cluster", "node-b")
    for i in range(MERGE_FANIN + 2):
        a.add(1_700_000_000_000_000 + i, [("cpu.percent", float(i), None, None, None)])
        a.flush()
    b.add(1_700_000_000_000_000, [("gpu.temperature_c", 70.0, "GPU-b", 3, None), ("gpu.name", None, "GPU-b", None, "H100")])
    b.flush()
    names = sorted(p.name for p in (run_dir / "hardware").iterdir())
    assert names == sorted([part_name(0, 8, 8, "node-a"), part_name(0, 9, 9, "node-a"), part_name(1, 0, 7, "node-a"),
                            part_name(0, 0, 0, "node-b")])
    table = expman.open_run(run_dir).hardware()
    assert table.num_rows == MERGE_FANIN + 4
    assert table.column_names == ["time", "host", "device", "key", "value", "text", "rank"]
    assert set(table["host"].to_pylist()) == {"node-a.cluster", "node-b.cluster"}
    assert expman.open_run(run_dir).hardware(keys=["gpu.name"])["text"].to_pylist() == ["H100"]
    # One host finishing compacts its own parts only.
    a.compact()
    assert sorted(p.writer for p in list_parts(run_dir / "hardware")) == ["node-a", "node-b"]
    # A merge cut short leaves a wider part beside the parts it holds: read once, tidied on reopen.
    b.add(1_700_000_000_000_001, [("gpu.temperature_c", 71.0, "GPU-b", 3, None)])
    b.flush()
    b._merge(list_parts(run_dir / "hardware", "node-b"), 1)
    hw = run_dir / "hardware"
    (hw / part_name(0, 1, 1, "node-b")).write_bytes((hw / part_name(1, 0, 1, "node-b")).read_bytes())
    assert expman.open_run(run_dir).hardware().num_rows == MERGE_FANIN + 5
    again = HardwareStore(run_dir, "node-b.cluster", "node-b")
    assert not (hw / part_name(0, 1, 1, "node-b")).exists()
    assert again._next == 2
    pattern = str(hw / "*.parquet")
    assert duckdb.sql(f"select host, count(*) from read_parquet('{pattern}') group by host order by host").fetchall() == [
        ("node-a.cluster", MERGE_FANIN + 2), ("node-b.cluster", 3)]


def test_empty_run_reads_an_empty_table(tmp_path):
    run_dir = Path(tmp_path)
    write_yaml_atomic(run_dir / "run.yaml", {"id": "3"})
    table = expman.open_run(run_dir).hardware()
    assert table.num_rows == 0 and "device" in table.column_names


# --- the rank's side ------------------------------------------------------------------------


def test_the_rank_tells_the_collector_what_it_needs(root, short_dir, monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-ab,GPU-cd")
    nobody = f"ipc://{short_dir}/nobody.sock"
    exp = expman.start_experiment("e", "hello", root=root, collector=nobody, log_hardware=True, hardware_interval=2)
    fields = ("log_hardware", "hardware_interval", "local_rank", "cuda_visible_devices", "nvidia_visible_devices")
    assert {k: exp._channel.hello[k] for k in fields} == {
        "log_hardware": True, "hardware_interval": 2.0, "local_rank": 3, "cuda_visible_devices": "1,0",
        "nvidia_visible_devices": "GPU-ab,GPU-cd"}
    assert exp.finish(timeout=0.1) is False  # nobody listens: bounded
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    plain = expman.start_experiment("e", "plain", root=root, collector=nobody)
    assert plain._channel.hello["log_hardware"] is False and plain._channel.hello["cuda_visible_devices"] is None
    plain.finish(timeout=0.1)
    for bad in (0, -1, "1", True, float("nan")):
        with pytest.raises(ValueError, match="hardware_interval"):
            expman.start_experiment("e", "bad", root=root, collector=nobody, log_hardware=True, hardware_interval=bad)
