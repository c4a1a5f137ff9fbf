"""The host as a whole, through psutil: CPU, load, memory, swap, disk, network.

Counters (CPU times, disk and network bytes) become rates over the time since the
previous sample; the first sample after construction measures from construction, so
build the source a moment (0.1 s is plenty) before the first `sample()`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Collection

from . import Reading

log = logging.getLogger("expman.collector")


def _cpu_total_idle(times: Any) -> tuple[float, float]:
    """Total and idle seconds of one psutil cputimes tuple, counted the way psutil does:
    guest time is already inside user/nice, and iowait is idle."""
    fields = times._asdict()
    total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
    return total, fields.get("idle", 0.0) + fields.get("iowait", 0.0)


def _busy_percent(before: tuple[float, float], after: tuple[float, float]) -> float:
    total = after[0] - before[0]
    idle = after[1] - before[1]
    if total <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (total - idle) / total))


def is_loopback(interface: str) -> bool:
    return interface == "lo" or (interface.startswith("lo") and interface[2:].isdigit())


class HostSource:
    """Readings about the whole host; `disk_path` names the filesystem whose usage is
    recorded (the collector passes its root, where the runs are written)."""

    def __init__(self, disk_path: str | Path, *, psutil: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        if psutil is None:
            import psutil
        self.psutil = psutil
        self.disk_path = str(disk_path)
        self.clock = clock
        self._failed: set[str] = set()  # parts that raised once: logged once, tried again each sample
        self._at = clock()
        self._cpu = self._cpu_times()
        self._disk = self._disk_counters()
        self._net = self._net_counters()

    # --- counters -------------------------------------------------------------------
    def _cpu_times(self) -> list[tuple[float, float]]:
        return [_cpu_total_idle(t) for t in self.psutil.cpu_times(percpu=True)]

    def _disk_counters(self) -> tuple[int, int] | None:
        io = self.psutil.disk_io_counters()
        return None if io is None else (io.read_bytes, io.write_bytes)

    def _net_counters(self) -> dict[str, tuple[int, int]]:
        return {name: (c.bytes_recv, c.bytes_sent) for name, c in self.psutil.net_io_counters(pernic=True).items()}

    # --- the one method ----------------------------------------------------------------
    def sample(self, pids: Collection[int] = ()) -> list[Reading]:
        now = self.clock()
        elapsed = now - self._at
        self._at = now
        out: list[Reading] = []
        for part in (self._sample_cpu, self._sample_memory, self._sample_disk, self._sample_net):
            try:
                part(out, elapsed)
            except Exception as exc:  # one broken part must not cost the others
                name = part.__name__
                if name not in self._failed:
                    self._failed.add(name)
                    log.warning("hardware: host %s failed (%s: %s); skipped while it keeps failing",
                                name[len("_sample_"):], type(exc).__name__, exc)
        return out

    def close(self) -> None:
        pass

    def _sample_cpu(self, out: list[Reading], elapsed: float) -> None:
        cpu = self._cpu_times()
        before, self._cpu = self._cpu, cpu
        if len(before) == len(cpu):
            total_before = (sum(t for t, _ in before), sum(i for _, i in before))
            total_after = (sum(t for t, _ in cpu), sum(i for _, i in cpu))
            out.append(Reading("cpu.percent", _busy_percent(total_before, total_after)))
            for core, (b, a) in enumerate(zip(before, cpu)):
                out.append(Reading("cpu.core.percent", _busy_percent(b, a), f"cpu{core}"))
        load1, load5, load15 = self.psutil.getloadavg()
        out += [Reading("load.1m", load1), Reading("load.5m", load5), Reading("load.15m", load15)]

    def _sample_memory(self, out: list[Reading], elapsed: float) -> None:
        vm = self.psutil.virtual_memory()
        out += [
            Reading("memory.total_bytes", float(vm.total)),
            Reading("memory.used_bytes", float(vm.used)),
            Reading("memory.available_bytes", float(vm.available)),
            Reading("memory.percent", float(vm.percent)),
        ]
        sw = self.psutil.swap_memory()
        out += [
            Reading("swap.total_bytes", float(sw.total)),
            Reading("swap.used_bytes", float(sw.used)),
            Reading("swap.percent", float(sw.percent)),
        ]

    def _sample_disk(self, out: list[Reading], elapsed: float) -> None:
        disk = self._disk_counters()
        before, self._disk = self._disk, disk
        if disk is not None and before is not None and elapsed > 0:
            read, write = disk[0] - before[0], disk[1] - before[1]
            if read >= 0 and write >= 0:  # a disk that went away makes the sums drop: skip that sample
                out += [Reading("disk.read_bytes_per_s", read / elapsed), Reading("disk.write_bytes_per_s", write / elapsed)]
        usage = self.psutil.disk_usage(self.disk_path)
        out += [
            Reading("disk.root.total_bytes", float(usage.total)),
            Reading("disk.root.used_bytes", float(usage.used)),
            Reading("disk.root.free_bytes", float(usage.free)),
            Reading("disk.root.percent", float(usage.percent)),
        ]

    def _sample_net(self, out: list[Reading], elapsed: float) -> None:
        net = self._net_counters()
        before, self._net = self._net, net
        if elapsed <= 0:
            return
        rx_total = tx_total = 0.0
        for name, (rx, tx) in net.items():
            prev = before.get(name)
            if prev is None or rx < prev[0] or tx < prev[1]:
                continue  # new interface, or its counters were reset: a rate from the next sample
            rx_rate, tx_rate = (rx - prev[0]) / elapsed, (tx - prev[1]) / elapsed
            out += [Reading("net.rx_bytes_per_s", rx_rate, name), Reading("net.tx_bytes_per_s", tx_rate, name)]
            if not is_loopback(name):
                rx_total += rx_rate
                tx_total += tx_rate
        out += [Reading("net.total.rx_bytes_per_s", rx_total), Reading("net.total.tx_bytes_per_s", tx_total)]
