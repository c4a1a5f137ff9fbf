"""Hardware sampling for the runs on this host that asked for it (`log_hardware=True`).

Two layers, policy apart from plumbing:

- `HardwarePlan` (no threads): which runs and ranks are sampled, when each run is due,
  and how one moment's readings become each run's rows (which rank a process or a GPU
  belongs to).
- `HardwareMonitor`: the receive loop's handle. Its methods only put a command on a
  queue and return; its own thread opens the sources when the first run arrives, samples
  (host, rank processes, GPUs), writes each run's rows through a HardwareStore, and
  closes the sources when the last run ends. A slow NVML call therefore never holds up
  frames or acknowledgements.

Every run gets a sample at once when it starts (after a 0.1 s window that the first
rates and CPU % are measured over), then one per interval, and a last one when its
ranks end.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from expman._env import hostname
from expman._wire.frames import Frame

from ._hardware_store import HardwareStore, Row
from .samplers import Reading
from .samplers.gpu import DeviceInfo, GpuSource, GpuUnavailable, device_for_rank, load_nvml

log = logging.getLogger("expman.collector")

NVML_MODULE_ENV = "EXPMAN_NVML_MODULE"  # tests: a module name or .py path used in place of pynvml
DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 3600.0
PRIME_S = 0.1  # the first sample of a run measures rates and CPU % over this window
FLUSH_INTERVAL_S = 2.0  # rows become a Parquet part at least this often
STOP_TIMEOUT_S = 10.0


def clamp_interval(value: Any, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except (TypeError, ValueError):
        seconds = default
    if not seconds == seconds:  # NaN
        seconds = default
    return min(max(seconds, MIN_INTERVAL_S), MAX_INTERVAL_S)


# --- policy -------------------------------------------------------------------------


@dataclass
class RankTarget:
    rank: int
    pid: int
    local_rank: int = 0
    cuda_visible_devices: str | None = None
    nvidia_visible_devices: str | None = None  # set in containers by the NVIDIA runtime
    ending: bool = False  # gets one last sample, then leaves


@dataclass
class RunTarget:
    uid: str
    run_dir: Path
    interval: float
    due: float
    ranks: dict[int, RankTarget] = field(default_factory=dict)
    needs_info: bool = True  # describe the devices (index, name, bus id) in its next sample


@dataclass
class Moment:
    """One sample of every source."""

    host: list[Reading]
    processes: list[Reading]
    gpus: list[Reading]
    devices: list[DeviceInfo]
    info: list[Reading]  # device descriptions, written to runs whose `needs_info` is set


class HardwarePlan:
    def __init__(self, default_interval: float = DEFAULT_INTERVAL_S) -> None:
        self.default_interval = default_interval
        self.runs: dict[str, RunTarget] = {}

    def add(self, uid: str, run_dir: Path, rank: RankTarget, interval: float | None, now: float) -> RunTarget:
        run = self.runs.get(uid)
        chosen = clamp_interval(interval, self.default_interval)
        if run is None:
            run = self.runs[uid] = RunTarget(uid, run_dir, chosen, now + PRIME_S)
        else:
            run.interval = chosen
            run.due = min(run.due, now + PRIME_S)  # a new rank is sampled at once too
        run.ranks[rank.rank] = rank
        return run

    def end(self, uid: str, rank: int, now: float) -> None:
        run = self.runs.get(uid)
        if run is not None and rank in run.ranks:
            run.ranks[rank].ending = True
            run.due = now

    def end_all(self, now: float) -> None:
        for run in self.runs.values():
            for target in run.ranks.values():
                target.ending = True
            run.due = now

    def pids(self) -> set[int]:
        return {target.pid for run in self.runs.values() for target in run.ranks.values()}

    def next_due(self) -> float | None:
        return min((run.due for run in self.runs.values()), default=None)

    def due(self, now: float) -> list[RunTarget]:
        return [run for run in self.runs.values() if run.due <= now]

    def sampled(self, run: RunTarget, now: float) -> bool:
        """After a run's sample: drop its ending ranks; True when none is left (the run is done)."""
        run.needs_info = False
        for rank in [r for r, target in run.ranks.items() if target.ending]:
            del run.ranks[rank]
        if not run.ranks:
            del self.runs[run.uid]
            return True
        run.due = max(run.due + run.interval, now)
        return False

    def rows(self, run: RunTarget, moment: Moment) -> list[Row]:
        """The rows of one moment for one run: host readings as they are, process readings
        of its ranks, and GPU readings with the rank(s) each device is attributed to."""
        rows: list[Row] = [(r.key, r.value, r.device, None, r.text) for r in moment.host]
        ranks_of_pid: dict[int, list[int]] = {}
        for target in run.ranks.values():
            ranks_of_pid.setdefault(target.pid, []).append(target.rank)
        for r in moment.processes:
            rows += [(r.key, r.value, None, rank, None) for rank in ranks_of_pid.get(r.pid, ())]
        if run.needs_info:
            rows += [(r.key, r.value, r.device, None, r.text) for r in moment.info]
        attributed = self.attribute(run, moment)
        for r in moment.gpus:
            if r.pid is not None:  # a process on a GPU: only the run's own, with its rank
                rows += [(r.key, r.value, r.device, rank, None) for rank in ranks_of_pid.get(r.pid, ())]
            else:
                for rank in attributed.get(r.device, (None,)):  # type: ignore[arg-type]
                    rows.append((r.key, r.value, r.device, rank, r.text))
        return rows

    @staticmethod
    def attribute(run: RunTarget, moment: Moment) -> dict[str, list[int]]:
        """Device UUID -> the run's ranks using it. A rank's process listed on a device by
        NVML decides; a rank not listed anywhere (no CUDA context yet, or a PID namespace
        that hides it) gets the device its NVIDIA_/CUDA_VISIBLE_DEVICES and local rank
        point to."""
        devices_of_pid: dict[int, list[str]] = {}
        for r in moment.gpus:
            if r.pid is not None and r.device is not None:
                devices_of_pid.setdefault(r.pid, []).append(r.device)
        out: dict[str, list[int]] = {}
        for target in sorted(run.ranks.values(), key=lambda t: t.rank):
            uuids = devices_of_pid.get(target.pid)
            if not uuids:
                guess = device_for_rank(target.cuda_visible_devices, target.local_rank, moment.devices,
                                        target.nvidia_visible_devices)
                uuids = [guess.uuid] if guess is not None else []
            for uuid in uuids:
                out.setdefault(uuid, []).append(target.rank)
        return out


# --- plumbing ---------------------------------------------------------------------------


class _Sources:
    """The sources of one sampling session (from the first run on this host to the last)."""

    def __init__(self, root: Path, nvml: Any, nvml_spec: str | None, told: set[Any]) -> None:
        from .samplers.host import HostSource
        from .samplers.process import ProcessSource

        self.host = HostSource(root)
        self.process = ProcessSource()
        self.gpu: GpuSource | None = None
        self.gpu_note = ""
        try:
            self.gpu = GpuSource(nvml if nvml is not None else load_nvml(nvml_spec))
        except GpuUnavailable as exc:
            self.gpu_note = str(exc)
        except Exception as exc:  # pynvml missing, or a stand-in that does not load
            self.gpu_note = f"the NVML module could not be loaded: {type(exc).__name__}: {exc}"
        if self.gpu is not None:
            log.info("hardware sampling started: %d GPU(s) (driver %s)", len(self.gpu.devices), self.gpu.driver or "?")
        elif "gpu" not in told:  # said once per collector, not per session
            told.add("gpu")
            log.warning("hardware sampling started without GPU metrics: %s; recording host and process metrics only",
                        self.gpu_note)
        else:
            log.info("hardware sampling started (no GPU: %s)", self.gpu_note)

    def sample(self, pids: set[int]) -> Moment:
        if self.gpu is not None:
            gpus, devices, info = self.gpu.sample(pids), self.gpu.devices, self.gpu.info_readings()
        else:
            gpus, devices, info = [], [], [Reading("gpu.count", 0.0, None, None, self.gpu_note)]
        return Moment(self.host.sample(pids), self.process.sample(pids), gpus, devices, info)

    def close(self) -> None:
        for source in (self.host, self.process, self.gpu):
            if source is not None:
                source.close()


class HardwareMonitor:
    """The collector's hardware sampler. `hello`, `rank_ended` and `close` are called from
    the receive loop; everything else happens on the monitor's own thread."""

    def __init__(
        self,
        root: Path,
        *,
        interval: float = DEFAULT_INTERVAL_S,
        host: str | None = None,
        writer: str | None = None,
        local_only: bool = False,
        nvml_spec: str | None = None,
        nvml: Any = None,
        flush_interval: float = FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.host = host or hostname()  # whose ranks are sampled; the rows' host
        self.writer = writer or self.host  # the collector's name, in the part files
        # Listening on ipc:// sockets only, every rank is on this machine whatever host name it
        # reports (a container's, say); else a rank must name this host or this collector.
        self.local_only = local_only
        self.interval = clamp_interval(interval, DEFAULT_INTERVAL_S)
        self.nvml_spec = nvml_spec if nvml_spec is not None else os.environ.get(NVML_MODULE_ENV) or None
        self.nvml = nvml  # a module object to use as NVML (tests); else pynvml or the one nvml_spec names
        self.flush_interval = flush_interval
        self.clock = clock
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._registered: set[tuple[str, int]] = set()  # (run, rank); touched by the receive loop only
        self._told: set[Any] = set()  # what was logged once: "gpu", ("host", name)

    # --- called from the receive loop: put a command, never wait --------------------------
    def hello(self, frame: Frame, run_dir: Path) -> None:
        body = frame.body
        key = (frame.run, frame.rank)
        if body.get("log_hardware") is not True:
            if key in self._registered:  # reopened without hardware logging
                self.rank_ended(frame.run, frame.rank)
            return
        if not self.local_only and frame.host not in (self.host, self.writer):
            if ("host", frame.host) not in self._told:
                self._told.add(("host", frame.host))
                log.warning("run %s rank %d asks for hardware sampling but runs on %s; this collector samples "
                            "ranks on %s only (run a collector on %s that writes to this root)",
                            frame.run, frame.rank, frame.host, self.host, frame.host)
            return
        pid, local_rank = body.get("pid"), body.get("local_rank", 0)
        cvd, nvd = body.get("cuda_visible_devices"), body.get("nvidia_visible_devices")
        if type(pid) is not int or pid <= 0:
            log.warning("run %s rank %d asks for hardware sampling without a valid pid (%r); host metrics only",
                        frame.run, frame.rank, pid)
            pid = -1  # matches no process and no GPU process
        target = RankTarget(frame.rank, pid, local_rank if type(local_rank) is int else 0,
                            cvd if isinstance(cvd, str) else None, nvd if isinstance(nvd, str) else None)
        self._registered.add(key)
        self._put(("add", frame.run, run_dir, target, body.get("hardware_interval")))

    def rank_ended(self, run: str, rank: int) -> None:
        if (run, rank) in self._registered:
            self._registered.discard((run, rank))
            self._put(("end", run, rank))

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Take a last sample of every run still sampled, write everything, stop the thread."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(("stop",))
        thread.join(timeout)
        if thread.is_alive():
            log.error("hardware sampler did not stop within %.0f s; its last rows may be missing", timeout)
        self._thread = None
        self._registered.clear()

    def _put(self, command: tuple[Any, ...]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="expman-hardware", daemon=True)
            self._thread.start()
        self._queue.put(command)

    # --- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        plan = HardwarePlan(self.interval)
        stores: dict[str, HardwareStore] = {}
        sources: _Sources | None = None
        stopping = False
        while True:
            try:
                due_at = plan.next_due()
                wait = None if due_at is None else max(0.0, due_at - self.clock())
                commands = [] if stopping else self._commands(wait)
                now = self.clock()
                for command in commands:
                    if command[0] == "add":
                        _, uid, run_dir, target, interval = command
                        if uid not in stores:
                            stores[uid] = HardwareStore(run_dir, self.host, self.writer)
                        if sources is None:
                            sources = _Sources(self.root, self.nvml, self.nvml_spec, self._told)
                        if target.pid > 0:
                            sources.process.track(target.pid)
                        plan.add(uid, run_dir, target, interval, now)
                    elif command[0] == "end":
                        plan.end(command[1], command[2], now)
                    elif command[0] == "stop":
                        stopping = True
                        plan.end_all(now)
                due = plan.due(now)
                if due and sources is not None:
                    self._sample(plan, due, sources, stores, now)
                for store in stores.values():
                    if store.pending_rows and now - store.flushed_at >= self.flush_interval:
                        store.flush()
                        store.flushed_at = now
                if sources is not None and not plan.runs:
                    sources.close()
                    sources = None
                    log.info("hardware sampling stopped: no run on this host asks for it")
                if stopping and not plan.runs:
                    return
            except Exception:  # never let a bug end sampling for good, nor take the collector down
                log.exception("hardware sampler failed; carrying on")
                if stopping:
                    return
                time.sleep(0.5)

    def _commands(self, wait: float | None) -> list[tuple[Any, ...]]:
        try:
            commands = [self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                commands.append(self._queue.get_nowait())
            except queue.Empty:
                return commands

    def _sample(self, plan: HardwarePlan, due: list[RunTarget], sources: _Sources,
                stores: dict[str, HardwareStore], now: float) -> None:
        time_us = int(time.time() * 1e6)  # the moment it starts: NVML calls may take a while
        moment = sources.sample(plan.pids())
        for run in due:
            store = stores.get(run.uid)
            if store is not None:
                store.add(time_us, plan.rows(run, moment))
            if plan.sampled(run, now):
                stores.pop(run.uid, None)
                if store is not None:
                    store.compact()
                log.info("run %s: hardware sampling ended (%d rows on %s)", run.uid, store.rows_written if store else 0,
                         self.host)
