"""Artifact names: normalized relative paths with `/` separators, nothing that can escape.

A name is what a reader asks for (`run.read_artifact("ckpt/last.pt")`) and what
`download_artifact` may join onto a folder, so the rules are strict and checked on
both sides: by the rank when it logs, by the collector when it stores, and by the
reader when it trusts a manifest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from expman._errors import ArtifactNameError

MAX_NAME_BYTES = 1024
MAX_SEGMENT_BYTES = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def normalize_name(name: object) -> str:
    """'a//b/./c' -> 'a/b/c'. Raise ArtifactNameError for anything that is not a plain
    relative path: empty, absolute, a drive letter, `..`, backslashes, NUL or other
    control characters, or too long."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise ArtifactNameError(f"artifact name must be a string, got {type(name).__name__}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ArtifactNameError(f"artifact name {name!r} is not valid UTF-8 (a file name with undecodable bytes?)") from None
    if "\x00" in name:
        raise ArtifactNameError(f"artifact name {name!r} contains a NUL byte")
    if _CONTROL.search(name):
        raise ArtifactNameError(f"artifact name {name!r} contains control characters")
    if "\\" in name:
        raise ArtifactNameError(f"artifact name {name!r} contains a backslash; use / between folders")
    if name.startswith("/") or _DRIVE.match(name):
        raise ArtifactNameError(f"artifact name {name!r} is absolute; names are relative paths like 'ckpt/model.pt'")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArtifactNameError(f"artifact name {name!r} contains '..'; names may not leave the artifacts folder")
    if not parts:
        raise ArtifactNameError(f"artifact name {name!r} is empty")
    clean = "/".join(parts)
    if len(clean.encode("utf-8")) > MAX_NAME_BYTES:
        raise ArtifactNameError(f"artifact name is longer than {MAX_NAME_BYTES} bytes: {clean[:40]!r}...")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise ArtifactNameError(f"artifact name {clean[:40]!r}... has a path segment over {MAX_SEGMENT_BYTES} bytes")
    return clean


def join_name(prefix: str | None, relative: str) -> str:
    """`prefix/relative`, normalized (the prefix may be None or empty)."""
    return normalize_name(f"{prefix}/{relative}" if prefix else relative)


def destination(folder: str | os.PathLike[str], name: str) -> Path:
    """Where artifact `name` goes under `folder`; refuses names that would land outside it
    (including through a symlink already inside the folder)."""
    clean = normalize_name(name)
    base = Path(folder).resolve()
    target = (base / clean).resolve()
    if target != base and base not in target.parents:
        raise ArtifactNameError(f"artifact name {name!r} would be written outside {base}")
    return target
