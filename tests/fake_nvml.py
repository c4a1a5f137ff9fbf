"""A stand-in for `pynvml` (nvidia-ml-py): the calls expman makes, over made-up GPUs.

Same names, argument order, units, return shapes and error type (`NVMLError` with the
NVML code in `.value`) as the real module, for the subset in
`expman.collector.samplers.gpu.NVML_CALLS`. Two ways to use it:

- in-process: `FakeNvml(gpus=[...])` is passed wherever the real module would be;
- in a collector process: set EXPMAN_NVML_MODULE to this file's path and
  EXPMAN_FAKE_NVML to a JSON file `{"gpus": [...], "init_error": null}`. The module-level
  functions read that file, and read it again whenever it changes, so a test can put
  processes on GPUs or break one while the collector runs.

A GPU is a dict; every field is optional (see `gpu()`). A field set to None makes its call
fail with NVML_ERROR_NOT_SUPPORTED; `errors` maps a function name to an NVML error code
it raises; `lost` (or an existing `lost_if_exists` path) makes every call on that device
raise NVML_ERROR_GPU_IS_LOST, the way a GPU that fell off the bus does.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_PCIE_UTIL_TX_BYTES = 0
NVML_PCIE_UTIL_RX_BYTES = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML error {self.value}")


def gpu(index: int, **fields: Any) -> dict[str, Any]:
    """A GPU description with plausible H100 figures; `fields` override them."""
    base: dict[str, Any] = {
        "uuid": f"GPU-{index:08x}-fake-4000-8000-{index:012d}",
        "name": "NVIDIA H100 80GB HBM3 (fake)",
        "bus_id": f"00000000:{0x18 + index:02X}:00.0",
        "util_gpu": 90 - index,
        "util_memory": 40 + index,
        "memory_total": 80 * 2**30,
        "memory_used": (10 + index) * 2**30,
        "power_mw": 350_000 + 1000 * index,
        "power_limit_mw": 700_000,
        "temperature": 60 + index,
        "clock_sm": 1980,
        "clock_mem": 2619,
        "fan": 30,
        "pcie_rx_kb": 1000 + index,
        "pcie_tx_kb": 2000 + index,
        "throttle": 0,
        "ecc_corrected": 0,
        "ecc_uncorrected": 0,
        "processes": [],
        "errors": {},
        "lost": False,
        "lost_if_exists": None,
    }
    base.update(fields)
    return base


class _Handle:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class FakeNvml:
    """The fake as an object that stands where the `pynvml` module would."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[dict[str, Any]] | None = None, *, init_error: int | None = None,
                 config_path: str | None = None) -> None:
        self.gpus = gpus or []
        self.init_error = init_error
        self.config_path = config_path
        self._config_stamp: tuple[int, int] | None = None
        self.initialized = 0
        self.calls: Counter[str] = Counter()
        if config_path:
            self._reload()

    def __getattr__(self, name: str) -> Any:  # the NVML_* constants, like the module has them
        if name.startswith("NVML_") and name in globals():
            return globals()[name]
        raise AttributeError(name)

    # --- configuration ---------------------------------------------------------------
    def _reload(self) -> None:
        if not self.config_path:
            return
        st = os.stat(self.config_path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._config_stamp:
            with open(self.config_path, encoding="utf-8") as fh:
                config = json.load(fh)
            self._config_stamp = stamp
            self.gpus = [gpu(i, **g) for i, g in enumerate(config.get("gpus", []))]
            self.init_error = config.get("init_error")

    def _device(self, handle: _Handle, fn: str) -> dict[str, Any]:
        self.calls[fn] += 1
        self._reload()
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        g = self.gpus[handle.index]
        if g.get("lost") or (g.get("lost_if_exists") and os.path.exists(g["lost_if_exists"])):
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        code = (g.get("errors") or {}).get(fn)
        if code is not None:
            raise NVMLError(code)
        return g

    def _field(self, handle: _Handle, fn: str, name: str) -> Any:
        value = self._device(handle, fn).get(name)
        if value is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return value

    # --- the API ------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        self._reload()
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15 (fake)"

    def nvmlDeviceGetCount(self) -> int:
        self.calls["nvmlDeviceGetCount"] += 1
        self._reload()
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        handle = _Handle(index)
        self._device(handle, "nvmlDeviceGetHandleByIndex")
        return handle

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._field(handle, "nvmlDeviceGetUUID", "uuid")

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._field(handle, "nvmlDeviceGetName", "name")

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> Any:
        return SimpleNamespace(busId=self._field(handle, "nvmlDeviceGetPciInfo", "bus_id").encode())  # bytes, as pynvml

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> Any:
        g = self._device(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=g["util_gpu"], memory=g["util_memory"])

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: Any = None) -> Any:
        g = self._device(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=g["memory_total"], used=g["memory_used"], free=g["memory_total"] - g["memory_used"])

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._field(handle, "nvmlDeviceGetPowerUsage", "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        return self._field(handle, "nvmlDeviceGetEnforcedPowerLimit", "power_limit_mw")

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._field(handle, "nvmlDeviceGetTemperature", "temperature")

    def nvmlDeviceGetClockInfo(self, handle: _Handle, clock_type: int) -> int:
        names = {NVML_CLOCK_SM: "clock_sm", NVML_CLOCK_MEM: "clock_mem"}
        if clock_type not in names:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._field(handle, "nvmlDeviceGetClockInfo", names[clock_type])

    def nvmlDeviceGetFanSpeed(self, handle: _Handle) -> int:
        return self._field(handle, "nvmlDeviceGetFanSpeed", "fan")

    def nvmlDeviceGetPcieThroughput(self, handle: _Handle, counter: int) -> int:
        names = {NVML_PCIE_UTIL_RX_BYTES: "pcie_rx_kb", NVML_PCIE_UTIL_TX_BYTES: "pcie_tx_kb"}
        if counter not in names:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._field(handle, "nvmlDeviceGetPcieThroughput", names[counter])

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        return self._field(handle, "nvmlDeviceGetCurrentClocksEventReasons", "throttle")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: _Handle) -> int:
        return self._field(handle, "nvmlDeviceGetCurrentClocksThrottleReasons", "throttle")

    def nvmlDeviceGetTotalEccErrors(self, handle: _Handle, error_type: int, counter_type: int) -> int:
        names = {NVML_MEMORY_ERROR_TYPE_CORRECTED: "ecc_corrected", NVML_MEMORY_ERROR_TYPE_UNCORRECTED: "ecc_uncorrected"}
        if error_type not in names or counter_type != NVML_VOLATILE_ECC:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._field(handle, "nvmlDeviceGetTotalEccErrors", names[error_type])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[Any]:
        g = self._device(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p.get("memory"), gpuInstanceId=None, computeInstanceId=None)
                for p in g.get("processes") or ()]


API = [name for name in vars(FakeNvml) if name.startswith("nvml")]

# --- module level: the functions pynvml has, over the GPUs in $EXPMAN_FAKE_NVML ------------
_instance: FakeNvml | None = None


def _shared() -> FakeNvml:
    global _instance
    if _instance is None:
        _instance = FakeNvml(config_path=os.environ["EXPMAN_FAKE_NVML"])
    return _instance


def _module_function(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_shared(), name)(*args, **kwargs)

    call.__name__ = name
    return call


for _name in API:
    globals()[_name] = _module_function(_name)
