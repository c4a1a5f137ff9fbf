"""What the collector accepts inside a well-formed frame: the one table of limits.

The wire module (expman/_wire/frames.py) checks a frame's shape and bounds its size and the
objects its decoding may build; this module checks every field of every frame kind before
anything touches a run: numbers are finite and in range (times fit the storage's
timestamps, ranks fit the run), strings are short enough and names carry no control
characters (a log text may: the writer indents its new lines), nested maps are bounded
in depth and size, and each field has the type its reader expects. A breach raises
ProtocolError("bad-values"), which the collector counts, logs and acknowledges as rejected.

The rank side (expman/_rank/values.py, start.py) refuses the same things at the call,
from the same constants and the same `time_problem`, so nothing the API accepts is
refused later.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from expman._wire import frames as proto
from expman._errors import ProtocolError

MAX_ID = 128  # run id, sender id
MAX_HOST = 255  # a DNS name's limit
MAX_KEY = 1024  # a metric key name
MAX_TEXT = 1024 * 1024  # a text value or a log line's text
MAX_LEVEL = 32
MAX_TAGS = 256
MAX_TAG = 256
MAX_PARAM_KEY = 1024
MAX_PARAM_DEPTH = 32
MAX_PARAM_ITEMS = 100_000  # every key and list item of a params frame, all levels
MAX_LOG_LINES = 100_000  # per frame
MAX_WORLD_SIZE = 1 << 20  # ranks of one run: 0 .. MAX_WORLD_SIZE - 1
MAX_PID = 2**31 - 1
MAX_SEQ = 2**63 - 1  # sequence numbers, artifact ids, sizes: what int64 holds
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # steps
MAX_PATH = 4096  # informational paths (the rank's root), device lists
MAX_INFO_DEPTH = 8  # software, code capture and error maps in run.yaml
MAX_INFO_ITEMS = 10_000
MAX_INTERVAL_S = 1e9  # heartbeat and hardware intervals: positive and finite, what the API takes
# Times are seconds since the epoch. run.yaml writes them as ISO dates (years 1970..9999)
# and Parquet as int64 microseconds; this range fits both.
MIN_TIME_S = 0.0
MAX_TIME_S = 253_402_300_799.0  # 9999-12-31T23:59:59Z
FINAL_STATUSES_SENT = ("finished", "failed", "killed")  # what a finish frame may say

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAME_LIMIT = 128
_BAD_NAME = re.compile(r"[/\\\x00-\x1f]")


def check_name(what: str, name: str) -> str:
    """Experiment and run names become folder names: refuse anything that could escape."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    if len(name) > _NAME_LIMIT:
        raise ValueError(f"{what} name is longer than {_NAME_LIMIT} characters: {name[:40]!r}...")
    if name in (".", "..") or _BAD_NAME.search(name):
        raise ValueError(f"{what} name {name!r} may not contain path separators or control characters")
    return name


def time_problem(value: Any) -> str | None:
    """Why `value` is not a time storage can hold (None when it is): a finite number of
    seconds since the epoch between 1970 and 9999; says which unit a too-large value
    looks like (milliseconds passed as seconds is the usual mistake)."""
    if type(value) is not float and type(value) is not int:
        return f"a {type(value).__name__} is not a number of seconds since the epoch"
    if MIN_TIME_S <= value <= MAX_TIME_S:
        return None
    if type(value) is float and not math.isfinite(value):
        return f"{value!r} is not a finite time"
    for divisor, unit in ((1e3, "milliseconds"), (1e6, "microseconds"), (1e9, "nanoseconds")):
        if MIN_TIME_S * divisor < value <= MAX_TIME_S * divisor:
            return f"{value!r} is not seconds since the epoch ({unit}? divide by {divisor:g})"
    return f"{_short(value)} is outside the times storage holds (1970 .. 9999 in seconds since the epoch)"


def _refuse(detail: str) -> None:
    raise ProtocolError("bad-values", detail)


def check_line(what: str, value: Any, limit: int, one_line: bool = True) -> str:
    """A string of at most `limit` characters; `one_line`: no control characters."""
    if not isinstance(value, str):
        _refuse(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        _refuse(f"{what} is longer than {limit} characters")
    if one_line and _CONTROL.search(value):
        _refuse(f"{what} {value[:40]!r} contains control characters")
    return value


def check_time(what: str, value: Any) -> None:
    problem = time_problem(value)
    if problem is not None:
        _refuse(f"{what}: {problem}")


def _int(what: str, value: Any, lo: int, hi: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not int or not lo <= value <= hi:
        _refuse(f"{what} must be an int in {lo}..{hi}, got {_short(value)}")


def _interval(what: str, value: Any) -> None:
    if value is None:
        return
    if type(value) not in (int, float) or not 0 < value <= MAX_INTERVAL_S:
        _refuse(f"{what} must be a positive number of seconds (at most {MAX_INTERVAL_S:g}), got {_short(value)}")


def _opt_line(what: str, value: Any, limit: int, one_line: bool = True) -> None:
    if value is not None:
        check_line(what, value, limit, one_line)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_data(what: str, value: Any, max_depth: int, max_items: int, max_str: int = MAX_TEXT) -> None:
    """Plain data bound for YAML: None, bools, ints, floats, strings of at most `max_str`
    characters, lists and maps with string keys; nesting and size bounded."""
    budget = max_items
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            _refuse(f"{what} nests deeper than {max_depth} levels")
        kind = type(item)
        if kind is dict:
            budget -= len(item)
            for key, inner in item.items():
                if type(key) is not str:
                    _refuse(f"{what}: names must be strings, got {type(key).__name__}")
                if len(key) > MAX_PARAM_KEY:
                    _refuse(f"{what}: a name is longer than {MAX_PARAM_KEY} characters")
                stack.append((inner, depth + 1))
        elif kind is list:
            budget -= len(item)
            stack.extend((inner, depth + 1) for inner in item)
        elif kind is str:
            if len(item) > max_str:
                _refuse(f"{what}: a string is longer than {max_str} characters")
        elif item is not None and kind not in (bool, int, float):
            _refuse(f"{what}: a value of type {kind.__name__} is not a scalar, list or map")
        if budget < 0:
            _refuse(f"{what} holds more than {max_items} items")


def check_envelope(frame: proto.Frame) -> None:
    """Every field of the frame, envelope and body, before it touches any run."""
    check_line("run id", frame.run, MAX_ID)
    check_line("sender id", frame.sender, MAX_ID)
    check_line("host", frame.host, MAX_HOST)
    if frame.rank >= MAX_WORLD_SIZE:
        _refuse(f"rank {frame.rank} is out of range (at most {MAX_WORLD_SIZE - 1})")
    _int("seq", frame.seq, 0, MAX_SEQ, optional=True)
    _int("low", frame.low, 0, MAX_SEQ)
    check_time("send time t", frame.sent_at)
    check_body(frame)


def check_body(frame: proto.Frame) -> None:
    _BODY_CHECKS[frame.kind](frame)


def _check_hello(frame: proto.Frame) -> None:
    body = frame.body
    for field in ("experiment", "name", "dir"):
        _opt_line(f"hello {field}", body.get(field), MAX_KEY, one_line=False)  # as names: check_name
    parent = body.get("parent")
    if parent is not None:  # looked up under the root by id: no separators, no control characters
        try:
            check_name("parent run id", parent)
        except ValueError as exc:
            _refuse(str(exc))
    tags = body.get("tags")
    if tags is not None:
        if type(tags) is not list or len(tags) > MAX_TAGS:
            _refuse(f"tags must be a list of at most {MAX_TAGS} strings")
        for tag in tags:
            check_line("tag", tag, MAX_TAG, one_line=False)
    world_size = body.get("world_size")
    _int("world_size", world_size, 1, MAX_WORLD_SIZE, optional=True)
    if frame.rank >= (world_size or 1):
        _refuse(f"rank {frame.rank} is outside [0, world_size={world_size or 1})")
    _int("pid", body.get("pid"), 0, MAX_PID, optional=True)
    for field in ("local_rank", "node_rank"):
        _int(field, body.get(field), 0, MAX_WORLD_SIZE, optional=True)
    if body.get("started_at") is not None:
        check_time("started_at", body["started_at"])
    for field in ("heartbeat_interval", "hardware_interval"):
        _interval(field, body.get(field))
    for field in ("reopen", "log_hardware"):
        if body.get(field) is not None and type(body[field]) is not bool:
            _refuse(f"hello {field} must be a bool")
    for field in ("launcher", "run_id_source"):
        _opt_line(f"hello {field}", body.get(field), MAX_ID)
    _opt_line("hello job", body.get("job"), MAX_KEY)
    for field in ("root", "cuda_visible_devices", "nvidia_visible_devices"):
        _opt_line(f"hello {field}", body.get(field), MAX_PATH, one_line=False)
    software = body.get("software")
    if software is not None:
        if type(software) is not dict:
            _refuse("hello software must be a map")
        check_data("hello software", software, MAX_INFO_DEPTH, MAX_INFO_ITEMS)


def _check_heartbeat(frame: proto.Frame) -> None:
    _int("pid", frame.body.get("pid"), 0, MAX_PID, optional=True)
    _int("last_step", frame.body.get("last_step"), INT64_MIN, INT64_MAX, optional=True)


def _steps_ok(steps: list[Any]) -> bool:
    """Every step an int64 or nil (C-level passes: this runs for every frame with a gap in its steps)."""
    given = [s for s in steps if s is not None]
    return not given or (set(map(type, given)) == {int} and INT64_MIN <= min(given) and max(given) <= INT64_MAX)


def _times_ok(times: list[Any]) -> bool:
    """Every time storable or nil; NaN makes the sum NaN (min and max may step over it)."""
    given = [t for t in times if t is not None] if None in times else times
    if not given:
        return True
    return (set(map(type, given)) <= {float, int} and MIN_TIME_S <= min(given) and max(given) <= MAX_TIME_S
            and not math.isnan(sum(given)))


def _first_bad_time(times: list[Any]) -> Any:
    return next(t for t in times if t is not None and time_problem(t) is not None)


def _check_metrics(frame: proto.Frame) -> None:
    body = frame.body
    keys = body.get("keys")
    if type(keys) is not dict:
        raise ProtocolError("bad-shape", "metrics keys must map int ids to names")
    for kid, name in keys.items():
        _int("metric key id", kid, 0, 2**31 - 1)
        check_line("metric key", name, MAX_KEY, one_line=False)
    for field in ("ids", "values"):
        if type(body.get(field)) is not bytes:
            raise ProtocolError("bad-shape", f"metrics {field} must be binary")
    steps = body.get("steps")
    if type(steps) is list and not _steps_ok(steps):
        _refuse("metrics steps must be ints in the int64 range or nil")
    elif type(steps) not in (list, bytes):
        raise ProtocolError("bad-shape", "metrics steps must be binary or a list")
    times = body.get("times")
    if times is not None:
        if type(times) is not list:
            raise ProtocolError("bad-shape", "metrics times must be a list")
        if not _times_ok(times):
            check_time("point time", _first_bad_time(times))
    texts = body.get("texts")
    if texts is not None:
        if type(texts) is not list:
            raise ProtocolError("bad-shape", "texts must be [id, text, step, time] rows")
        for row in texts:
            if type(row) is not list or len(row) != 4:
                raise ProtocolError("bad-shape", "texts must be [id, text, step, time] rows")
            _int("text key id", row[0], 0, 2**31 - 1)
            if type(row[1]) is not str or len(row[1]) > MAX_TEXT:
                _refuse(f"a text value must be a string of at most {MAX_TEXT} characters")
            _int("text step", row[2], INT64_MIN, INT64_MAX, optional=True)
            if row[3] is not None:
                check_time("text time", row[3])


def _check_params(frame: proto.Frame) -> None:
    params = frame.body.get("params")
    if type(params) is not dict:
        raise ProtocolError("bad-shape", "params body must be a map")
    check_data("parameters", params, MAX_PARAM_DEPTH, MAX_PARAM_ITEMS)


def _check_log(frame: proto.Frame) -> None:
    lines = frame.body.get("lines")
    if type(lines) is not list or len(lines) > MAX_LOG_LINES:
        _refuse(f"log lines must be a list of at most {MAX_LOG_LINES}")
    for entry in lines:
        if type(entry) is not list or len(entry) != 3:
            raise ProtocolError("bad-shape", "log lines are [time, level, text]")
        when, level, text = entry
        check_time("log time", when)
        check_line("log level", level, MAX_LEVEL)
        if type(text) is not str or len(text) > MAX_TEXT:
            _refuse(f"a log line must be text of at most {MAX_TEXT} characters")


def _check_finish(frame: proto.Frame) -> None:
    body = frame.body
    if body.get("status") not in FINAL_STATUSES_SENT:
        _refuse(f"unknown final status {_short(body.get('status'))}")
    if body.get("ended_at") is not None:
        check_time("ended_at", body["ended_at"])
    _int("last_step", body.get("last_step"), INT64_MIN, INT64_MAX, optional=True)
    _int("dropped_points", body.get("dropped_points"), 0, MAX_SEQ, optional=True)
    error = body.get("error")
    if error is not None:
        if type(error) is not dict:
            _refuse("finish error must be a map of type, message, traceback")
        check_data("finish error", error, 2, 100)


def _check_artifact(frame: proto.Frame) -> None:
    body = frame.body
    for field in ("id", "i", "size"):
        _int(f"artifact {field}", body.get(field), 0, MAX_SEQ)
    check_line("artifact name", body.get("name"), MAX_PATH)
    if body.get("time") is not None:
        check_time("artifact time", body["time"])
    if body.get("encrypt") is not None and type(body["encrypt"]) is not bool:
        _refuse("artifact encrypt must be a bool")
    _opt_line("artifact abort", body.get("abort"), MAX_KEY, one_line=False)
    proto.read_artifact_body(body)  # the chunk rules (bad-shape)


def _check_code(frame: proto.Frame) -> None:
    code = frame.body.get("code")
    if type(code) is not dict:
        raise ProtocolError("bad-shape", "code body must hold a map under 'code'")
    check_data("code", code, MAX_INFO_DEPTH, MAX_INFO_ITEMS)


_BODY_CHECKS: dict[str, Callable[[proto.Frame], None]] = {
    proto.HELLO: _check_hello,
    proto.HEARTBEAT: _check_heartbeat,
    proto.METRICS: _check_metrics,
    proto.PARAMS: _check_params,
    proto.LOG: _check_log,
    proto.FINISH: _check_finish,
    proto.ARTIFACT: _check_artifact,
    proto.CODE: _check_code,
}
