"""What counts as a metric value, a step, a time, or a parameter: the slow-path checks.

The logging hot path handles plain floats inline and calls into here for everything
else, so these functions may take their time. They refuse at the call what the collector
would refuse later, from the same table of limits (expman/_wire/limits.py).
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
from dataclasses import dataclass
from typing import Any

from expman._rank.device import hold, is_device_scalar

from expman._errors import ProtocolError
from expman._wire import limits


@dataclass(frozen=True, slots=True)
class Metric:
    """One point for `Experiment.log_metrics([...])`."""

    key: str
    value: Any
    step: int | None = None
    timestamp: float | None = None


EVAL_PREFIX = "eval/"  # evaluation metrics (Experiment.log_eval_metrics) are keys under it


def eval_key(name: str) -> str:
    """The stored key of an evaluation metric (the prefix once, whatever the caller passes)."""
    return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"metric key must be a non-empty str, got {key!r}")
    if len(key) > limits.MAX_KEY or "\x00" in key:
        raise ValueError(f"metric key {key[:60]!r} is longer than {limits.MAX_KEY} characters or contains NUL")
    return key


def coerce_number(key: str, value: Any) -> Any:
    """Return a float, the str itself for a text value, or a held device tensor; TypeError
    naming the key otherwise (ValueError for a text longer than the collector stores)."""
    if isinstance(value, str):
        if len(value) > limits.MAX_TEXT:
            raise ValueError(f"metric {key!r}: a text value holds at most {limits.MAX_TEXT} characters, got {len(value)}")
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
        step = operator.index(step)  # numpy integers too
    except TypeError:
        raise TypeError(f"metric {key!r}: step must be an int or None, got {type(step).__name__}") from None
    if not limits.INT64_MIN <= step <= limits.INT64_MAX:
        raise ValueError(f"metric {key!r}: step {step} does not fit in 64 bits")
    return step


def coerce_time(key: str, when: Any) -> float:
    """Seconds since the epoch from a float or a datetime (naive datetimes are local time);
    ValueError, naming the key, for a time the storage cannot hold (1970 .. 9999), with a
    hint when it looks like milliseconds."""
    if isinstance(when, _dt.datetime):
        seconds = when.timestamp()
    elif isinstance(when, (int, float)) and not isinstance(when, bool):
        try:
            seconds = float(when)
        except OverflowError:  # an int past what a float holds
            raise ValueError(f"metric {key!r}: timestamp is outside the times storage holds (1970 .. 9999)") from None
        if not math.isfinite(seconds):
            raise TypeError(f"metric {key!r}: timestamp must be epoch seconds or a datetime, got {when!r}")
    else:
        raise TypeError(f"metric {key!r}: timestamp must be epoch seconds or a datetime, got {when!r}")
    problem = limits.time_problem(seconds)
    if problem is not None:
        raise ValueError(f"metric {key!r}: timestamp {problem}")
    return seconds


def check_log_text(text: Any) -> str:
    """A log line's text as run.log takes it; ValueError when it is longer than the collector stores."""
    text = str(text)
    if len(text) > limits.MAX_TEXT:
        raise ValueError(f"a log line holds at most {limits.MAX_TEXT} characters, got {len(text)}")
    return text


def check_world_size(world_size: int) -> int:
    """A run's world size as the collector takes it: at most MAX_WORLD_SIZE ranks."""
    if world_size > limits.MAX_WORLD_SIZE:
        raise ValueError(f"world size {world_size} is over the {limits.MAX_WORLD_SIZE} ranks a run may have")
    return world_size


def check_tags(tags: Any) -> list[str]:
    """Run tags as the collector takes them: at most MAX_TAGS, each at most MAX_TAG characters."""
    if tags is None:
        return []
    if isinstance(tags, (str, bytes)) or not hasattr(tags, "__iter__"):
        raise TypeError(f"tags must be a list of strings, got {type(tags).__name__}")
    out = [str(t) for t in tags]
    if len(out) > limits.MAX_TAGS:
        raise ValueError(f"a run takes at most {limits.MAX_TAGS} tags, got {len(out)}")
    for tag in out:
        if len(tag) > limits.MAX_TAG:
            raise ValueError(f"tag {tag[:40]!r}... is longer than {limits.MAX_TAG} characters")
    return out


def check_param(key: str, value: Any, _depth: int = 0) -> Any:
    """Parameters are scalars, lists and nested dicts with str keys; return a YAML-safe copy."""
    if _depth > limits.MAX_PARAM_DEPTH:
        raise TypeError(f"parameter {key!r} is nested too deeply")
    if isinstance(value, str) and len(value) > limits.MAX_TEXT:
        raise ValueError(f"parameter {key!r}: a string holds at most {limits.MAX_TEXT} characters, got {len(value)}")
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
            if len(k) > limits.MAX_PARAM_KEY:
                raise ValueError(f"parameter {key!r}: a name is longer than {limits.MAX_PARAM_KEY} characters")
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
        if len(key) > limits.MAX_PARAM_KEY:
            raise ValueError(f"parameter name {key[:40]!r}... is longer than {limits.MAX_PARAM_KEY} characters")
        out[key] = check_param(key, value)
    try:
        limits.check_data("parameters", out, limits.MAX_PARAM_DEPTH, limits.MAX_PARAM_ITEMS)
    except ProtocolError as exc:  # the item budget: one frame holds at most MAX_PARAM_ITEMS
        raise ValueError(exc.detail) from None
    return out
