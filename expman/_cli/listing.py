"""What `expman ls` needs of each run.yaml, read from its text in one pass.

`expman ls` over 10,000 runs spent most of its time building every run.yaml as Python
objects (software, jobs, every rank's times) to show eight fields. A file the collector
wrote has a known shape (`write_yaml_atomic`: libyaml's block style, keys in the
collector's order, one `key: value` a line, rank fields four spaces in), so those eight
fields are found with a line scan. Anything the scan cannot vouch for (a file not
starting with `id:`, a double-quoted or wrapped value, a block scalar) is parsed in full
with YAML instead: the answer is the same either way, only the cost differs.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import yaml

from expman._storage.layout import parse_yaml_mapping

FIELDS = ("id", "name", "experiment", "status", "started_at", "ended_at", "duration_s", "world_size")
# Patterns start with a newline, not `^`: Python's re then jumps from newline to newline
# instead of trying every character (5x faster on a run.yaml of 32 ranks). The text is
# scanned as "\n" + text + "\n", so every line starts and ends with one.
_TOP = re.compile(rf"\n({'|'.join(FIELDS)}|ranks):(?: ([^\n]*))?(?=\n)")
_NEXT_TOP = re.compile(r"\n(?=\S)")
_RANK_LINES = re.compile(r"\n(?:  (\S[^\n]*)|    status:(?: ([^\n]*))?)(?=\n)")
_WRAPPED_STATUS = re.compile(r"\n    status:[^\n]*\n     ")
# A plain scalar the dumper wrote for a string (it quotes any string YAML would read as
# something else), or null: taken as it stands. Anything fancier goes to the full parse.
_PLAIN = re.compile(r"[\w.+\-/@]+(?: [\w.+\-/@]+)*$")
_NULLS = frozenset({"null", "~", "Null", "NULL"})
_RESOLVER = yaml.resolver.Resolver()
_STR = "tag:yaml.org,2002:str"


class _Unsure(Exception):
    """The line scan met something it does not read exactly: parse the file in full."""


def summary_fields(text: str, where: str) -> dict[str, Any]:
    """The run.yaml fields `expman ls` shows: FIELDS, and `ranks` as {rank: {"status": ...}}.
    ExpmanError when the text is not a YAML mapping."""
    if text.startswith("id:"):
        try:
            return _scan(text)
        except _Unsure:
            pass
    return parse_yaml_mapping(text, where)


def _scan(text: str) -> dict[str, Any]:
    doc = "\n" + text + "\n"
    info: dict[str, Any] = {}
    for match in _TOP.finditer(doc):
        key = match[1]
        if key in info or (key != "ranks" and _continues(doc, match.end(), 0)):
            raise _Unsure  # a key twice (YAML's rules, not ours), or a wrapped value
        if key == "ranks":
            info[key] = _ranks(doc, match)
        else:
            info[key] = _value(key, match[2])
    return info


def _ranks(doc: str, match: re.Match[str]) -> dict[str, dict[str, Any]]:
    """The `ranks:` block: each rank's status (the block runs to the next top-level line)."""
    if match[2] is not None:
        if match[2].strip() == "{}":
            return {}
        raise _Unsure  # a flow mapping
    block_end = _NEXT_TOP.search(doc, match.end())
    block = doc[match.end():block_end.start() + 1 if block_end else len(doc)]
    if _WRAPPED_STATUS.search(block):
        raise _Unsure
    ranks: dict[str, dict[str, Any]] = {}
    rank: dict[str, Any] | None = None
    for key, status in _RANK_LINES.findall(block):  # one C call; a rank's key, or its status
        if key:
            if not key.endswith(":") or ": " in key or key[:-1] in ranks:
                raise _Unsure
            rank = ranks[key[:-1]] = {}
        elif rank is None or "status" in rank:
            raise _Unsure
        else:
            rank["status"] = _status(status)
    return ranks


@functools.lru_cache(maxsize=64)
def _status(text: str) -> Any:
    """A rank's status (a handful of words, the same in most runs: each checked once)."""
    return _value("status", text)


def _continues(doc: str, end: int, indent: int) -> bool:
    """Whether the line ending at `end`, indented `indent`, goes on in the next (a wrapped value)."""
    return doc.startswith("\n" + " " * (indent + 1), end)


def _value(key: str, text: str | None) -> Any:
    if text is None or text in _NULLS:
        return None
    if key == "duration_s":
        try:
            return float(text)
        except ValueError:
            raise _Unsure from None
    if key == "world_size":
        if not text.isdigit() or (text.startswith("0") and text != "0"):
            raise _Unsure  # YAML 1.1 reads 010 as octal
        return int(text)
    if len(text) >= 2 and text[0] == "'" and text[-1] == "'" and "'" not in text[1:-1].replace("''", ""):
        return text[1:-1].replace("''", "'")
    if _PLAIN.match(text) and not text.startswith(("-", "@")) and _resolves_to_str(text):
        return text
    raise _Unsure


def _resolves_to_str(text: str) -> bool:
    """Whether YAML reads this plain scalar as a string (not a number, a bool or a time)."""
    return _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == _STR
