"""What the collector accepts inside a well-formed frame: lengths, characters, nesting.

The wire module (expman/_wire/frames.py) checks a frame's shape and bounds its size and the
objects its decoding may build; this module bounds what a frame may put into a run's
files: names that become folders stay inside the root (check_name),
strings that reach run.yaml, run.log and Parquet are short enough, and names and levels
carry no control characters (a log text may: the writer indents its new lines). A breach raises ProtocolError("bad-values"),
which the collector counts, logs and acknowledges as rejected.
"""

from __future__ import annotations

import re
from typing import Any

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


def check_envelope(frame: proto.Frame) -> None:
    check_line("run id", frame.run, MAX_ID)
    check_line("sender id", frame.sender, MAX_ID)
    check_line("host", frame.host, MAX_HOST)
    if frame.rank > 2**31 - 1:
        _refuse(f"rank {frame.rank} is out of range")
    check_body(frame)


def check_body(frame: proto.Frame) -> None:
    body = frame.body
    kind = frame.kind
    if kind == proto.HELLO:
        tags = body.get("tags")
        if tags is not None:
            if not isinstance(tags, list) or len(tags) > MAX_TAGS:
                _refuse(f"tags must be a list of at most {MAX_TAGS} strings")
            for tag in tags:
                check_line("tag", tag, MAX_TAG, one_line=False)
        for field in ("experiment", "name", "dir"):
            if body.get(field) is not None:
                check_line(f"hello {field}", body[field], MAX_KEY, one_line=False)  # names: check_name
        parent = body.get("parent")
        if parent is not None:  # looked up under the root by id: no separators, no control characters
            try:
                check_name("parent run id", parent)
            except ValueError as exc:
                _refuse(str(exc))
    elif kind == proto.METRICS:
        keys = body.get("keys")
        if isinstance(keys, dict):
            for name in keys.values():
                if isinstance(name, str):
                    check_line("metric key", name, MAX_KEY, one_line=False)
        texts = body.get("texts")
        if isinstance(texts, list):
            for row in texts:
                if isinstance(row, list) and len(row) == 4 and isinstance(row[1], str) and len(row[1]) > MAX_TEXT:
                    _refuse(f"a text value is longer than {MAX_TEXT} characters")
    elif kind == proto.LOG:
        lines = body.get("lines")
        if not isinstance(lines, list) or len(lines) > MAX_LOG_LINES:
            _refuse(f"log lines must be a list of at most {MAX_LOG_LINES}")
        for entry in lines:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ProtocolError("bad-shape", "log lines are [time, level, text]")
            when, level, text = entry
            if not isinstance(when, (int, float)) or isinstance(when, bool) or not -1e12 < when < 1e12:
                _refuse(f"log time {when!r} is not a time in seconds")
            check_line("log level", str(level), MAX_LEVEL)
            if not isinstance(text, str) or len(text) > MAX_TEXT:
                _refuse(f"a log line must be text of at most {MAX_TEXT} characters")
    elif kind == proto.PARAMS:
        params = body.get("params")
        if isinstance(params, dict):
            _check_params(params)


def _check_params(params: dict[Any, Any]) -> None:
    """Keys are strings; nesting and size are bounded (config.yaml is written from this)."""
    budget = MAX_PARAM_ITEMS
    stack: list[tuple[Any, int]] = [(params, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_PARAM_DEPTH:
            _refuse(f"parameters nest deeper than {MAX_PARAM_DEPTH} levels")
        if isinstance(value, dict):
            budget -= len(value)
            for key, item in value.items():
                if not isinstance(key, str):
                    _refuse(f"parameter names must be strings, got {type(key).__name__}")
                if len(key) > MAX_PARAM_KEY:
                    _refuse(f"a parameter name is longer than {MAX_PARAM_KEY} characters")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            budget -= len(value)
            stack.extend((item, depth + 1) for item in value)
        if budget < 0:
            _refuse(f"parameters hold more than {MAX_PARAM_ITEMS} items")
