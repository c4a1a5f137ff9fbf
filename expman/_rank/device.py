"""Device tensors (CUDA and others) logged without a device sync.

Turning a CUDA scalar into a float (`float(t)`, `t.item()`) waits for the GPU to finish
everything queued before it: one sync per metric per step, which can halve a training
loop's speed. So the hot path keeps the tensor instead (`hold`: detached, and copied on
its device, a queued copy that does not wait, so a later in-place change cannot alter the
logged value), and the sender thread reads a whole batch of them at once (`DeviceBatch`):
one stack on the device, one non-blocking copy into pinned host memory, and an event it
polls between ticks; the batch is packed only once the event says the copy is done.
Devices without events (MPS, XLA, ...) are read with a plain copy on the sender thread,
still off the training thread. torch is never imported here: only objects that already
are tensors reach this module.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from expman._wire.columns import POINT_STRIDE

log = logging.getLogger("expman")


def is_device_scalar(value: Any) -> bool:
    """A one-element torch tensor that lives off the CPU (no torch import needed to ask)."""
    device = getattr(value, "device", None)
    return (device is not None and getattr(device, "type", "cpu") != "cpu"
            and type(value).__module__.startswith("torch") and value.numel() == 1)


def hold(value: Any) -> Any:
    """What the buffer keeps for a device scalar: a private 0-d copy on its device."""
    return value.detach().reshape(()).clone()


class DeviceBatch:
    """Points of one run whose values include held tensors, on their way to floats.

    `points` is a copy of the buffer slice (POINT_STRIDE items a point); `ready()` says when
    every held value has been replaced by a float, so the slice can be packed like any
    other. A tensor that cannot be read costs its own point only (removed, counted in
    `failed`, said once per batch).
    """

    def __init__(self, points: list[Any], warn: Callable[[str], None]) -> None:
        self.points = points
        self.failed = 0
        self._warn = warn
        self._slots = [i for i in range(1, len(points), POINT_STRIDE)
                       if points[i].__class__ is not float and points[i].__class__ is not int]
        self._host: Any = None
        self._event: Any = None
        try:
            self._start()
        except Exception as exc:  # noqa: BLE001 - a device that cannot stack costs speed, not points
            self._warn(f"device values read one by one ({exc})")
            self._read_one_by_one()

    def _start(self) -> None:
        import torch

        tensors = [self.points[i] for i in self._slots]
        stacked = torch.stack(tensors).to(torch.float64) if len({t.device for t in tensors}) == 1 else None
        if stacked is None:
            raise ValueError("values on several devices")
        if stacked.device.type == "cuda":
            self._host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(stacked.device))
        else:
            self._host = stacked.to("cpu")

    def _read_one_by_one(self) -> None:
        bad = []
        for i in self._slots:
            try:
                self.points[i] = float(self.points[i])
            except Exception as exc:  # noqa: BLE001 - one bad tensor costs its point, loudly
                bad.append(i - 1)
                error = exc
        self._slots = []
        if bad:
            self.failed = len(bad)
            self._warn(f"{len(bad)} logged tensor(s) could not be read ({error}); those points are dropped")
            for start in reversed(bad):
                del self.points[start : start + POINT_STRIDE]

    def ready(self) -> bool:
        """True once the values are floats; never blocks."""
        if not self._slots:
            return True
        try:
            if self._event is not None and not self._event.query():
                return False
            values = self._host.tolist()
        except Exception as exc:  # noqa: BLE001 - a failed copy: read each, so one bad tensor costs one point
            self._warn(f"device values read one by one ({exc})")
            self._read_one_by_one()
            return True
        for i, value in zip(self._slots, values):
            self.points[i] = value
        self._slots = []
        return True
