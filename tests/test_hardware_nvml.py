"""The GPU path against the real `pynvml` and driver. Skips where there is no NVIDIA driver
(CI, laptops); run it on a GPU machine with `pytest -s tests/test_hardware_nvml.py` and
read what it prints."""

from __future__ import annotations

import os
import time

import pytest

import expman
from expman.collector.samplers.gpu import GpuSource
from conftest import start_collector


@pytest.fixture
def real_nvml():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver on this machine: {exc}")
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        pytest.skip("the NVIDIA driver sees no GPU")
    return pynvml


def test_real_nvml_source_reads_every_gpu(real_nvml):
    source = GpuSource(real_nvml)
    try:
        t0 = time.perf_counter()
        readings = source.sample({os.getpid()})
        took = time.perf_counter() - t0
    finally:
        source.close()
    print(f"\ndriver {source.driver}; {len(source.devices)} GPU(s); one sample took {took * 1000:.1f} ms")
    for d in source.devices:
        mine = {r.key: r.value for r in readings if r.device == d.uuid and r.pid is None}
        print(f"  {d.index} {d.uuid} {d.name} {d.bus_id}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(mine.items())))
        for key in ("gpu.utilization.gpu_percent", "gpu.memory.used_bytes", "gpu.memory.total_bytes",
                    "gpu.power.draw_w", "gpu.temperature_c", "gpu.clock.sm_mhz"):
            assert key in mine, (d, key)
        assert mine["gpu.memory.total_bytes"] > 0


def test_real_nvml_end_to_end(real_nvml, root, short_dir, monkeypatch):
    monkeypatch.delenv("EXPMAN_NVML_MODULE", raising=False)
    c = start_collector(root, short_dir)
    try:
        with expman.start_experiment("hw", "real-gpu", root=root, collector=c.endpoint, log_hardware=True,
                                     hardware_interval=0.2) as exp:
            time.sleep(1.5)
    finally:
        assert c.stop() == 0, c.log()
    table = expman.open_run(exp.run_dir).hardware()
    gpu_keys = sorted({k for k in table["key"].to_pylist() if k.startswith("gpu.")})
    devices = sorted({d for d, k in zip(table["device"].to_pylist(), table["key"].to_pylist()) if k == "gpu.name"})
    print(f"\n{table.num_rows} rows, {len(set(table['time'].to_pylist()))} samples; GPUs {devices}; keys {gpu_keys}")
    assert devices and "gpu.utilization.gpu_percent" in gpu_keys
