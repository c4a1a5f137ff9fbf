"""Finding runs: the Runs screen's filter words and which parameters deserve a column.

    lr=0.001  loss<0.5  optimizer.name!=sgd  tag:baseline  mnist

A word `key<op>value` compares a run's parameter (dotted, as config.yaml flattens) or,
failing that, the latest value of a metric; numbers compare as numbers, anything else
only with = and !=. `tag:x` wants the tag. Any other word is looked for in the
experiment, name, id, status, hosts and tags. Every word must hold.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

COMPARISON = re.compile(r"^([A-Za-z_][\w./-]*)(<=|>=|==|!=|=|<|>)(.+)$")
_MISSING = "\0missing"


class Filterable(Protocol):
    experiment: str
    name: str
    uid: str
    status: str
    hosts: tuple[str, ...]
    tags: tuple[str, ...]
    params: dict[str, Any]

    def value(self, key: str) -> Any: ...


def matches(run: Filterable, text: str) -> bool:
    words = text.strip().split()
    if not words:
        return True
    hay = " ".join((run.experiment, run.name, run.uid, run.status, *run.hosts, *run.tags)).lower()
    for word in words:
        if word.lower().startswith("tag:"):
            if word[4:].lower() not in (t.lower() for t in run.tags):
                return False
            continue
        found = COMPARISON.match(word)
        if found:
            if not compare(run.value(found.group(1)), found.group(2), found.group(3)):
                return False
        elif word.lower() not in hay:
            return False
    return True


def compare(have: Any, op: str, wanted: str) -> bool:
    """`have <op> wanted`; a run without the key passes only `!=`."""
    if have is None:
        return op == "!="
    number, mine = _number(wanted), _number(have)
    if number is not None and mine is not None:
        a: Any = mine
        b: Any = number
    else:
        a, b = str(have).lower(), wanted.lower()
        if op not in ("=", "==", "!="):
            return False  # text has no order worth filtering on
    return {"=": a == b, "==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _number(value: Any) -> float | None:
    if isinstance(value, (bool, int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def param_columns(runs: list[Filterable], limit: int = 4) -> list[str]:
    """Parameters whose values differ between `runs` (what a sweep varies), by name, at most `limit`."""
    keys = sorted({k for run in runs for k in run.params})
    varying = [k for k in keys if len({_hashable(run.params.get(k, _MISSING)) for run in runs}) > 1]
    return varying[:limit]


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, (list, dict, set)) else value
