"""What counts as a metric value, a step, a time, or a parameter: the slow-path checks.

The logging hot path handles plain floats inline and calls into here for everything
else, so these functions may take their time.
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
from dataclasses import dataclass
from typing import Any

from expman._rank.device import hold, is_device_scalar



@dataclass(frozen=True, slots=True)
class Metric:
    """One point for `Experiment.log_metrics([...])`."""

    key: str
    value: Any
    step: int | None = None
    timestamp: float | None = None


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"metric key must be a non-empty str, got {key!r}")
    if len(key) > 1024 or "\x00" in key:
        raise ValueError(f"metric key {key[:60]!r} is too long or contains NUL")
    return key


def coerce_number(key: str, value: Any) -> Any:
    """Return a float, the str itself for a text value, or a held device tensor; TypeError
    naming the key otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, dict, list, tuple, set)) or value is None:
        raise TypeError(f"metric {key!r}: value of type {type(value).__name__} is not a number or str")
    if is_device_scalar(value):
        return hold(value)  # read later, in a batch, by the sender (expman/_rank/device.py): no sync here
    try:
        return float(value)  # int, bool, numpy scalars, 0-d CPU tensors (__float__)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r}: value of type {type(value).__name__} is not a number or str") from exc


def coerce_step(key: str, step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError(f"metric {key!r}: step must be an int, got a bool")
    try:
        return operator.index(step)  # numpy integers too
    except TypeError:
        raise TypeError(f"metric {key!r}: step must be an int or None, got {type(step).__name__}") from None


def coerce_time(key: str, when: Any) -> float:
    """Seconds since the epoch from a float or a datetime (naive datetimes are local time)."""
    if isinstance(when, _dt.datetime):
        return when.timestamp()
    if isinstance(when, (int, float)) and not isinstance(when, bool) and math.isfinite(when):
        return float(when)
    raise TypeError(f"metric {key!r}: timestamp must be epoch seconds or a datetime, got {when!r}")


def check_param(key: str, value: Any, _depth: int = 0) -> Any:
    """Parameters are scalars, lists and nested dicts with str keys; return a YAML-safe copy."""
    if _depth > 32:
        raise TypeError(f"parameter {key!r} is nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value if type(value) in (int, float) else (int(value) if isinstance(value, int) else float(value))
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return check_param(key, value.item(), _depth + 1)  # numpy / torch scalars
    if isinstance(value, (list, tuple)):
        return [check_param(f"{key}[{i}]", v, _depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"parameter {key!r}: dict keys must be str, got {k!r}")
            out[k] = check_param(f"{key}.{k}", v, _depth + 1)
        return out
    raise TypeError(f"parameter {key!r}: value of type {type(value).__name__} is not a scalar, list or dict")


def check_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise TypeError(f"parameters must be a dict, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"parameter names must be non-empty str, got {key!r}")
        out[key] = check_param(key, value)
    return out
