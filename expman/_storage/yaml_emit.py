"""YAML text of the collector's own files (run.yaml, hosts/*.yaml), byte for byte as libyaml writes it.

PyYAML's dumper builds a node per value in Python before libyaml emits it (~0.2 ms for a
run.yaml), and a collector with a thousand live runs rewrites their run.yaml all the
time. Those files hold only maps, lists, strings, numbers, booleans and nulls in block
style, which this emitter writes directly (~10x less CPU). It vouches only for what it
knows libyaml writes the same way (plain and single-quoted strings on lines too short
to wrap, ASCII); for anything else `emit` returns None and the caller uses libyaml, so
readers (expman/_cli/listing.py reads this shape with a line scan) see one format.
tests/storage/test_yaml_emit.py compares the two on a corpus and on random documents.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import yaml

_RESOLVER = yaml.resolver.Resolver()
_STR = "tag:yaml.org,2002:str"
_WIDTH = 80  # libyaml's best width: a scalar with spaces may be wrapped past it
_PLAIN = re.compile(r"(?:[A-Za-z0-9_./+]|-(?=\S))(?:[A-Za-z0-9_./+-]| (?=[A-Za-z0-9_./+-]))*")  # no ": ", " #", indicators
_QUOTABLE = re.compile(r"[ -~]*")  # printable ASCII: single quotes hold it as it is (a quote doubled)


class _Unsure(Exception):
    """A value this emitter does not vouch for: libyaml writes the document."""


@functools.lru_cache(maxsize=4096)
def _string(text: str) -> str:
    """A string scalar as libyaml writes it in block context (short lines only: see `_line`)."""
    if _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == _STR:
        if _PLAIN.fullmatch(text) and not text.startswith(("---", "...")):  # not a document marker
            return text
        raise _Unsure  # plain or quoted: libyaml's call
    # Read plain, it would be another type (a number, a date, null): libyaml quotes it.
    if _QUOTABLE.fullmatch(text) and not text.startswith(" ") and not text.endswith(" "):
        return "'" + text.replace("'", "''") + "'"
    raise _Unsure


def _scalar(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return _string(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value).lower()
        return text.replace("e", ".0e", 1) if "." not in text and "e" in text else text
    raise _Unsure


def _line(out: list[str], prefix: str, value: Any, indent: int) -> None:
    """`prefix` then a scalar or an empty collection; a long one with spaces is folded onto
    lines indented by `indent` as libyaml folds it."""
    if type(value) is dict or type(value) is list:
        text = "{}" if type(value) is dict else "[]"
    else:
        text = _scalar(value)
        if " " in text and len(prefix) + len(text) > _WIDTH:
            text = _fold(text, len(prefix), indent)
    out.append(prefix + text + "\n")


def _fold(text: str, column: int, indent: int) -> str:
    """libyaml's folding of a plain or single-quoted scalar that starts at `column`: a single
    space (not the quoted scalar's first or last character) past the best width becomes a
    line break and the indent."""
    quoted = text.startswith("'")
    pieces: list[str] = []
    start = 0
    for i, char in enumerate(text):
        if (char == " " and column > _WIDTH and text[i - 1] != " " and text[i + 1] != " "
                and not (quoted and (i == 1 or i == len(text) - 2))):
            pieces.append(text[start:i])
            start = i + 1
            column = indent
        else:
            column += 1
    pieces.append(text[start:])
    return ("\n" + " " * indent).join(pieces)


def _mapping(out: list[str], data: dict[Any, Any], indent: int, first: str | None = None) -> None:
    """Block mapping at `indent`; `first` replaces the first line's indent (a list item's "- ")."""
    pad = " " * indent
    for key, value in data.items():
        if type(key) is not str and type(key) is not int:
            raise _Unsure
        lead = pad if first is None else first
        first = None
        head = f"{lead}{_scalar(key)}:"
        if len(head) - indent > 100:
            raise _Unsure  # libyaml writes long keys in the explicit "? " form
        if value and (type(value) is dict or type(value) is list):
            out.append(head + "\n")
            if type(value) is dict:
                _mapping(out, value, indent + 2)
            else:
                _sequence(out, value, indent)  # lists in maps are not indented
        else:
            _line(out, head + " ", value, indent + 2)


def _sequence(out: list[str], data: list[Any], indent: int) -> None:
    dash = " " * indent + "- "
    for item in data:
        if item and type(item) is dict:
            _mapping(out, item, indent + 2, dash)
        elif item and type(item) is list:
            start = len(out)
            _sequence(out, item, indent + 2)
            out[start] = dash + out[start][indent + 2:]
        else:
            _line(out, dash, item, indent + 2)


def emit(data: dict[Any, Any]) -> str | None:
    """`data` as `yaml.dump(data, Dumper=CSafeDumper, sort_keys=False, allow_unicode=True)`
    writes it, or None where this emitter cannot vouch for the same text."""
    if not data or type(data) is not dict:
        return None
    out: list[str] = []
    try:
        _mapping(out, data, 0)
    except (_Unsure, RecursionError):
        return None
    return "".join(out)
