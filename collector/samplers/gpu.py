"""NVIDIA GPUs through NVML: one set of readings per device, keyed by the device's UUID.

`nvml` is the module to call: the real `pynvml` (nvidia-ml-py) or a stand-in with the
same names (tests/fake_nvml.py). Only the subset listed in `NVML_CALLS` is used.

Degradation: no NVML library, no driver or no GPU raises `GpuUnavailable` from the
constructor (the caller samples the host only). A call that a device does not support
(a fan on a passively cooled card, ECC on a consumer card) is dropped for that device
and never made again. A device that reports NVML_ERROR_GPU_IS_LOST gets one `gpu.lost`
reading and is not sampled again; the others carry on.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Collection, NamedTuple

from . import Reading

log = logging.getLogger("expman.collector")

# The NVML functions this module calls: the interface a fake has to offer.
NVML_CALLS = (
    "nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetPciInfo", "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo", "nvmlDeviceGetFanSpeed", "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetComputeRunningProcesses",
)

# pynvml's values, used when a module does not define them.
_CONSTANTS = {
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_TEMPERATURE_GPU": 0,
    "NVML_CLOCK_SM": 1,
    "NVML_CLOCK_MEM": 2,
    "NVML_PCIE_UTIL_TX_BYTES": 0,
    "NVML_PCIE_UTIL_RX_BYTES": 1,
    "NVML_MEMORY_ERROR_TYPE_CORRECTED": 0,
    "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
    "NVML_VOLATILE_ECC": 0,
}


class GpuUnavailable(Exception):
    """No GPU can be sampled on this host; the message says why."""


class DeviceInfo(NamedTuple):
    index: int
    uuid: str
    name: str
    bus_id: str


def load_nvml(spec: str | None = None) -> Any:
    """The NVML module: `pynvml`, or the module that `spec` names (a module name, or the
    path of a .py file), which tests use to put a fake in the collector's place."""
    if not spec:
        return importlib.import_module("pynvml")
    if spec.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("expman_nvml_stand_in", spec)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {spec}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _Lost(Exception):
    pass


class GpuSource:
    """Opens NVML and finds the devices on construction; `sample()` reads them all."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self._c = {name: getattr(nvml, name, default) for name, default in _CONSTANTS.items()}
        self._never_again = {self._c["NVML_ERROR_NOT_SUPPORTED"], self._c["NVML_ERROR_NO_PERMISSION"],
                             self._c["NVML_ERROR_FUNCTION_NOT_FOUND"]}
        self.devices: list[DeviceInfo] = []
        self.driver = ""
        self._handles: dict[str, Any] = {}
        self._lost: set[str] = set()
        self._unsupported: dict[str, set[str]] = {}
        self._warned: set[tuple[str, str, Any]] = set()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML could not start: {exc}") from None
        try:
            try:
                self.driver = _text(nvml.nvmlSystemGetDriverVersion())
            except nvml.NVMLError:
                pass
            count = nvml.nvmlDeviceGetCount()
            for index in range(count):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    info = DeviceInfo(index, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)),
                                      _text(nvml.nvmlDeviceGetPciInfo(handle).busId))
                except nvml.NVMLError as exc:
                    log.warning("hardware: GPU %d cannot be read (%s); it is not sampled", index, exc)
                    continue
                self.devices.append(info)
                self._handles[info.uuid] = handle
                self._unsupported[info.uuid] = set()
        except nvml.NVMLError as exc:
            self.close()
            raise GpuUnavailable(f"NVML could not list the GPUs: {exc}") from None
        if not self.devices:
            self.close()
            raise GpuUnavailable("NVML found no GPU" if count == 0 else "no GPU could be read")

    def info_readings(self) -> list[Reading]:
        """What each device is (once per run and sampling session): index, name, PCI bus id."""
        out = [Reading("gpu.count", float(len(self.devices)), None, None, self.driver or None)]
        for d in self.devices:
            out += [Reading("gpu.index", float(d.index), d.uuid), Reading("gpu.name", None, d.uuid, None, d.name),
                    Reading("gpu.bus_id", None, d.uuid, None, d.bus_id)]
        return out

    def sample(self, pids: Collection[int] = ()) -> list[Reading]:
        """Readings of every device that is not lost; per-process memory only for `pids`."""
        out: list[Reading] = []
        for device in self.devices:
            if device.uuid in self._lost:
                continue
            try:
                self._sample_device(device, pids, out)
            except _Lost as exc:
                self._lost.add(device.uuid)
                log.warning("hardware: GPU %d (%s) is lost (%s); it is no longer sampled, the other GPUs are",
                            device.index, device.uuid, exc)
                out.append(Reading("gpu.lost", 1.0, device.uuid))
            except Exception as exc:  # a bug or an odd library must not stop the other devices
                self._warn_once(device, "sample", type(exc).__name__, f"GPU {device.index} ({device.uuid}) failed: {exc!r}")
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass

    # --- one device ----------------------------------------------------------------
    def _sample_device(self, d: DeviceInfo, pids: Collection[int], out: list[Reading]) -> None:
        nvml, c, uuid = self.nvml, self._c, d.uuid

        def add(key: str, value: Any, scale: float = 1.0) -> None:
            if value is not None:
                out.append(Reading(key, float(value) * scale, uuid))

        util = self._call(d, "utilization", nvml.nvmlDeviceGetUtilizationRates)
        if util is not None:
            add("gpu.utilization.gpu_percent", util.gpu)
            add("gpu.utilization.memory_percent", util.memory)
        memory = self._call(d, "memory", nvml.nvmlDeviceGetMemoryInfo)
        if memory is not None:
            add("gpu.memory.used_bytes", memory.used)
            add("gpu.memory.total_bytes", memory.total)
        add("gpu.power.draw_w", self._call(d, "power.draw", nvml.nvmlDeviceGetPowerUsage), 1e-3)  # mW
        add("gpu.power.limit_w", self._call(d, "power.limit", nvml.nvmlDeviceGetEnforcedPowerLimit), 1e-3)
        add("gpu.temperature_c", self._call(d, "temperature", nvml.nvmlDeviceGetTemperature, c["NVML_TEMPERATURE_GPU"]))
        add("gpu.clock.sm_mhz", self._call(d, "clock.sm", nvml.nvmlDeviceGetClockInfo, c["NVML_CLOCK_SM"]))
        add("gpu.clock.memory_mhz", self._call(d, "clock.memory", nvml.nvmlDeviceGetClockInfo, c["NVML_CLOCK_MEM"]))
        add("gpu.fan_percent", self._call(d, "fan", nvml.nvmlDeviceGetFanSpeed))
        # NVML reports KB/s, measured over a 20 ms window inside the call.
        add("gpu.pcie.rx_bytes_per_s", self._call(d, "pcie.rx", nvml.nvmlDeviceGetPcieThroughput, c["NVML_PCIE_UTIL_RX_BYTES"]), 1024)
        add("gpu.pcie.tx_bytes_per_s", self._call(d, "pcie.tx", nvml.nvmlDeviceGetPcieThroughput, c["NVML_PCIE_UTIL_TX_BYTES"]), 1024)
        add("gpu.throttle_reasons", self._throttle_reasons(d))
        add("gpu.ecc.volatile.corrected", self._call(d, "ecc.corrected", nvml.nvmlDeviceGetTotalEccErrors,
                                                     c["NVML_MEMORY_ERROR_TYPE_CORRECTED"], c["NVML_VOLATILE_ECC"]))
        add("gpu.ecc.volatile.uncorrected", self._call(d, "ecc.uncorrected", nvml.nvmlDeviceGetTotalEccErrors,
                                                       c["NVML_MEMORY_ERROR_TYPE_UNCORRECTED"], c["NVML_VOLATILE_ECC"]))
        processes = self._call(d, "processes", nvml.nvmlDeviceGetComputeRunningProcesses) or ()
        for p in processes:
            if p.pid in pids:
                used = p.usedGpuMemory  # None where NVML cannot tell (some containers, WDDM)
                out.append(Reading("gpu.process.memory_used_bytes", None if used is None else float(used), uuid, p.pid))

    def _throttle_reasons(self, d: DeviceInfo) -> Any:
        """Clock event reasons (driver 535+), else the older, deprecated call."""
        unsupported = self._unsupported[d.uuid]
        newer = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if newer is not None and "throttle.event" not in unsupported:
            value = self._call(d, "throttle.event", newer)
            if "throttle.event" not in unsupported:
                return value
        older = getattr(self.nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        return None if older is None else self._call(d, "throttle", older)

    def _call(self, d: DeviceInfo, what: str, fn: Any, *args: Any) -> Any:
        """fn(handle, *args), or None when the device cannot answer; raises _Lost."""
        unsupported = self._unsupported[d.uuid]
        if what in unsupported:
            return None
        try:
            return fn(self._handles[d.uuid], *args)
        except self.nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == self._c["NVML_ERROR_GPU_IS_LOST"]:
                raise _Lost(str(exc)) from None
            if code in self._never_again:
                unsupported.add(what)
                log.debug("hardware: GPU %d: %s not available (%s); not asked again", d.index, what, exc)
            else:
                self._warn_once(d, what, code, f"GPU {d.index} ({d.uuid}): reading {what} failed: {exc}")
            return None

    def _warn_once(self, d: DeviceInfo, what: str, code: Any, message: str) -> None:
        if (d.uuid, what, code) not in self._warned:
            self._warned.add((d.uuid, what, code))
            log.warning("hardware: %s (skipped while it keeps failing)", message)


# --- which device a rank uses ---------------------------------------------------------


def _match(entry: str, devices: list[DeviceInfo], by_position: bool) -> DeviceInfo | None:
    """The device one CUDA_/NVIDIA_VISIBLE_DEVICES entry names: a number (a position in
    `devices`, or an NVML index), or a unique UUID prefix with or without "GPU-"."""
    if entry.isdigit():
        number = int(entry)
        if by_position:
            return devices[number] if number < len(devices) else None
        return next((d for d in devices if d.index == number), None)
    if not entry or entry.upper().startswith("MIG-"):
        return None  # MIG instances are not mapped to their parent device
    wanted = entry.upper().removeprefix("GPU-")
    found = [d for d in devices if d.uuid.upper().removeprefix("GPU-").startswith(wanted)]
    return found[0] if len(found) == 1 else None


def visible_devices(cuda_visible_devices: str | None, devices: list[DeviceInfo],
                    nvidia_visible_devices: str | None = None) -> list[DeviceInfo]:
    """The devices a process sees, in CUDA's order.

    A container sees the GPUs its NVIDIA_VISIBLE_DEVICES names (the NVIDIA container
    runtime and Kubernetes device plugin set it; unset or "all": every GPU), numbered
    from 0 in NVML's order. CUDA_VISIBLE_DEVICES then picks among those (unset: all); like
    CUDA, its list ends at the first entry that names no device or repeats one.
    """
    base = sorted(devices, key=lambda d: d.index)
    container = (nvidia_visible_devices or "").strip().lower()
    if container in ("none", "void"):
        return []
    if nvidia_visible_devices is not None and container not in ("", "all"):
        named = [_match(e.strip(), base, by_position=False) for e in nvidia_visible_devices.split(",")]
        base = sorted({d for d in named if d is not None}, key=lambda d: d.index)
    if cuda_visible_devices is None:
        return base
    out: list[DeviceInfo] = []
    for raw in cuda_visible_devices.split(","):
        match = _match(raw.strip(), base, by_position=True)
        if match is None or match in out:
            break
        out.append(match)
    return out


def device_for_rank(cuda_visible_devices: str | None, local_rank: int, devices: list[DeviceInfo],
                    nvidia_visible_devices: str | None = None) -> DeviceInfo | None:
    """The device a rank most likely uses when NVML does not list its process yet: the
    only one it sees, else the one at its local rank (the torchrun / Slurm convention)."""
    visible = visible_devices(cuda_visible_devices, devices, nvidia_visible_devices)
    if len(visible) == 1:
        return visible[0]
    if 0 <= local_rank < len(visible):
        return visible[local_rank]
    return None
