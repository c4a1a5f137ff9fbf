"""`log_artifact` / `log_artifacts` on the caller's thread: names, the folder walk, the hand-over.

What runs here is cheap and checks everything a caller must hear about at once (a bad
name, a missing folder, links that leave it); the content itself is pinned down and sent
by the sender's artifact pump (expman/_rank/artifacts.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from expman._errors import ArtifactNameError
from expman._rank.artifacts import pump_for
from expman._rank.channel import RunChannel
from expman._storage.artifact_names import join_name, normalize_name

if TYPE_CHECKING:
    from expman._rank.sender import Sender

log = logging.getLogger("expman")


def refuse_after_finish(run: RunChannel, what: str) -> bool:
    if run.finish_request is None:
        return False
    log.error("expman: run %s is finished; %s logged after finish() is not stored", run.uid, what)
    run.artifacts.failed += 1
    return True


def log_file(run: RunChannel, sender: Sender, path: str | os.PathLike[str], name: str | None) -> str:
    clean = normalize_name(name if name is not None else os.path.basename(os.fspath(path).rstrip("/")))
    if not refuse_after_finish(run, f"artifact {clean!r}"):
        pump_for(sender).snapshot(run, path, clean)
    return clean


def log_directory(run: RunChannel, sender: Sender, directory: str | os.PathLike[str], prefix: str | None,
                  follow_symlinks: bool) -> list[str]:
    """Every regular file under `directory`, named `prefix/relative path`. Symlinks that
    resolve inside the folder are logged with their target's content; symlinks that point
    outside it (or nowhere) are skipped with a warning, unless follow_symlinks=True; linked
    folders are never descended (no loops, no escapes)."""
    base = Path(directory)
    if not base.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory; use log_artifact() for a file")
    if prefix is not None:
        normalize_name(prefix)
    real_base = base.resolve()
    runs_root = Path(run.root).resolve()
    plan: list[tuple[str, Path]] = []
    skipped: list[str] = []
    for folder, dirs, files in os.walk(base, followlinks=False):
        here = Path(folder)
        for d in list(dirs):
            if (here / d).is_symlink():
                skipped.append(f"{(here / d).relative_to(base)} (a linked folder)")
                dirs.remove(d)
            elif (here / d).resolve() == runs_root:  # never the runs being written, this one included
                log.warning("expman: log_artifacts(%s) leaves out %s, the runs' root folder", directory, here / d)
                dirs.remove(d)
        dirs.sort()
        for f in sorted(files):
            path = here / f
            relative = path.relative_to(base).as_posix()
            if path.is_symlink():
                target = path.resolve()
                inside = target == real_base or real_base in target.parents
                if not target.is_file():
                    skipped.append(f"{relative} (a link to {target}, which is not a file)")
                    continue
                if not inside and not follow_symlinks:
                    skipped.append(f"{relative} (a link to {target}, outside {real_base})")
                    continue
            elif not path.is_file():
                continue
            try:
                plan.append((join_name(prefix, relative), path))
            except ArtifactNameError as exc:
                skipped.append(f"{relative!r} ({exc})")
    if skipped:
        text = "; ".join(skipped[:20]) + (f"; and {len(skipped) - 20} more" if len(skipped) > 20 else "")
        log.warning("expman: run %s: log_artifacts(%s) skipped %d entries: %s (pass follow_symlinks=True "
                    "to follow links that leave the folder)", run.uid, directory, len(skipped), text)
        run.post("log", [time.time(), "warning", f"log_artifacts({directory}) skipped {len(skipped)} entries: {text}"])
    if refuse_after_finish(run, f"artifacts of {directory}"):
        return []
    pump = pump_for(sender)
    for name, path in plan:
        pump.snapshot(run, path, name)
    return [name for name, _ in plan]


def capture_code(run: RunChannel, sender: Sender, code_dir: str | os.PathLike[str] | None) -> None:
    """Queue code capture for `run` (runs on the pump thread: git and file reads stay off
    the caller)."""
    pump_for(sender).capture_code(run, Path(code_dir).resolve() if code_dir is not None else None)
