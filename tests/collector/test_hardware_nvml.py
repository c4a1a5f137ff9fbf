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


def test_real_gpu_memory_is_attributed_to_the_rank_that_holds_it(real_nvml, root, short_dir, run_script, monkeypatch):
    """A rank that allocates on the GPU shows up as that rank's process memory, read by the
    collector from NVML (not reported by the rank)."""
    pytest.importorskip("torch")
    monkeypatch.delenv("EXPMAN_NVML_MODULE", raising=False)
    c = start_collector(root, short_dir)
    try:
        result = run_script(f"""
            import time, torch, expman
            assert torch.cuda.is_available()
            with expman.start_experiment("hw", "real-gpu-rank", root={str(root)!r}, collector={c.endpoint!r},
                                         rank=1, world_size=2, log_hardware=True, hardware_interval=0.2) as exp:
                held = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # 512 MiB
                torch.cuda.synchronize()
                time.sleep(2.0)
                print(exp.run_dir)
            """, timeout=120, check=True)
    finally:
        assert c.stop() == 0, c.log()
    run_dir = result.stdout.strip().splitlines()[-1]
    rows = expman.open_run(run_dir).hardware().to_pylist()
    mine = [r for r in rows if r["key"] == "gpu.process.memory_used_bytes" and r["rank"] == 1]
    print(f"\n{len(mine)} per-process GPU memory rows for rank 1; max {max(r['value'] for r in mine) / 2**20:.0f} MiB"
          if mine else "\nno per-process rows")
    assert mine, sorted({(r["key"], r["rank"]) for r in rows if r["key"].startswith("gpu.")})
    assert max(r["value"] for r in mine) >= 512 * 2**20
