"""What code a run ran: the files to store under `code/` and the git facts for run.yaml.

- `code_dir` in a git checkout: the tracked and the untracked-but-not-ignored files under
  it (git decides), plus commit, branch, remote (credentials removed), dirty flag and
  `git diff HEAD` (capped) stored as `code/.expman/git.diff`.
- `code_dir` elsewhere: source files under it (by suffix), honouring .gitignore files
  (the usual syntax: globs, `**`, `!`, trailing `/`, leading `/`) and skipping virtual
  environments and caches.
- no `code_dir`: the launching script (sys.argv[0], when it is a file outside the Python
  installation) and the git facts of its folder (or of the working directory).

Caps: FILE_CAP per file, TOTAL_CAP and COUNT_CAP per run, DIFF_CAP for the diff; what
they leave out is counted in run.yaml (`code.skipped`, `code.truncated`). Runs on the
artifact pump thread: git subprocesses and file reads never touch the training thread.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expman._storage.artifact_names import join_name
from expman._errors import ArtifactNameError

log = logging.getLogger("expman")

CODE_PREFIX = "code"
DIFF_NAME = "code/.expman/git.diff"
FILE_CAP = 1024 * 1024
TOTAL_CAP = 16 * 1024 * 1024
COUNT_CAP = 2000
DIFF_CAP = 1024 * 1024
GIT_TIMEOUT_S = 10.0
_SKIPPED_LISTED = 20

SOURCE_SUFFIXES = frozenset(
    ".py .pyi .pyx .pxd .ipynb .c .cc .cpp .cxx .h .hh .hpp .cu .cuh .rs .go .java .scala .kt .jl .r .lua "
    ".sh .bash .zsh .fish .ps1 .bat .sql .yaml .yml .toml .json .jsonnet .cfg .ini .conf .txt .md .rst "
    ".proto .cmake .mk .gin .hydra .env.example".split()
)
SOURCE_NAMES = frozenset(
    "Makefile Dockerfile Containerfile CMakeLists.txt requirements.txt Pipfile Pipfile.lock poetry.lock "
    "pyproject.toml setup.py setup.cfg environment.yml MANIFEST.in Justfile .gitignore".split()
)
SKIP_DIRS = frozenset(
    ".git .hg .svn __pycache__ .venv venv .tox .nox .mypy_cache .pytest_cache .ruff_cache .ipynb_checkpoints "
    "node_modules .eggs build dist wandb mlruns".split()
)


@dataclass
class CodeCapture:
    source: str  # git | files | script | none
    folder: Path | None
    files: list[tuple[str, Path]] = field(default_factory=list)
    git: dict[str, Any] | None = None
    diff: bytes | None = None
    diff_name: str = DIFF_NAME
    total: int = 0
    truncated: bool = False
    skipped: list[str] = field(default_factory=list)
    script: str | None = None

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(f"{name} ({why})")

    def add(self, relative: str, path: Path) -> bool:
        """Plan one file; False once a run-wide cap is reached."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            self.skip(relative, f"unreadable: {exc.strerror}")
            return True
        if size > FILE_CAP:
            self.skip(relative, f"{size} bytes, over the {FILE_CAP}-byte cap")
            return True
        if len(self.files) >= COUNT_CAP or self.total + size > TOTAL_CAP:
            self.truncated = True
            return False
        try:
            name = join_name(CODE_PREFIX, relative)
        except ArtifactNameError as exc:
            self.skip(relative, str(exc))
            return True
        if name.startswith(DIFF_NAME.rsplit("/", 1)[0] + "/"):
            self.skip(relative, "reserved for expman's own files")
            return True
        self.files.append((name, path))
        self.total += size
        return True

    def meta(self) -> dict[str, Any]:
        """What run.yaml records under `code`."""
        out: dict[str, Any] = {
            "source": self.source,
            "dir": str(self.folder) if self.folder else None,
            "files": len(self.files),
            "bytes": self.total,
            "truncated": self.truncated,
            "skipped": len(self.skipped),
        }
        if self.skipped:
            out["skipped_files"] = self.skipped[:_SKIPPED_LISTED]
        if self.script:
            out["script"] = self.script
        if self.git is not None:
            out["git"] = self.git
        return out


def collect(code_dir: Path | None, exclude: list[Path] = ()) -> CodeCapture:  # type: ignore[assignment]
    """Plan a capture (no file contents are read here, except by git)."""
    excluded = [p.resolve() for p in exclude]
    if code_dir is None:
        return _script_capture(excluded)
    folder = Path(code_dir).resolve()
    if not folder.is_dir():
        capture = CodeCapture("none", folder)
        capture.skip(str(folder), "code_dir is not a folder")
        log.error("expman: code_dir %s is not a folder; no code captured", folder)
        return capture
    top = _git_text(["rev-parse", "--show-toplevel"], folder)
    if top:
        capture = CodeCapture("git", folder)
        listing = _git(["ls-files", "-z", "--cached", "--others", "--exclude-standard"], folder)
        for relative in sorted(set((listing or b"").decode("utf-8", "surrogateescape").split("\0")) - {""}):
            path = folder / relative
            if _under(path, excluded) or not path.is_file() or _escapes(path, folder):
                continue
            if not capture.add(relative, path):
                break
        capture.git, capture.diff = git_facts(folder, top)
        return capture
    capture = CodeCapture("files", folder)
    _walk_sources(capture, folder, excluded)
    return capture


def _script_capture(excluded: list[Path]) -> CodeCapture:
    script = _launching_script()
    folder = script.parent if script else Path.cwd()
    capture = CodeCapture("script" if script else "none", folder)
    if script is not None and not _under(script, excluded):
        capture.add(script.name, script)
        if capture.files:
            capture.script = capture.files[0][0]
    top = _git_text(["rev-parse", "--show-toplevel"], folder)
    if top:
        capture.git, capture.diff = git_facts(folder, top)
    return capture


def _launching_script() -> Path | None:
    """sys.argv[0] when it is a file of the user's, not an installed tool (pytest, torchrun)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if not argv0 or argv0 == "-c":
        return None
    path = Path(argv0).resolve()
    if not path.is_file():
        return None
    installs = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if any(base in path.parents for base in installs):
        return None
    return path


def _under(path: Path, folders: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == f or f in resolved.parents for f in folders)


def _escapes(path: Path, folder: Path) -> bool:
    """A symlink that leads out of the captured folder is not followed."""
    if not path.is_symlink():
        return False
    target = path.resolve()
    return not (target == folder or folder in target.parents)


# --- git ---------------------------------------------------------------------------------------

_GIT_ENV = {"GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def _git(args: list[str], cwd: Path, limit: int | None = None) -> bytes | None:
    """git's stdout, or None if git is missing or fails. With `limit`, stops reading after
    limit + 1 bytes (the caller sees it was cut)."""
    env = {**os.environ, **_GIT_ENV}
    try:
        proc = subprocess.Popen(["git", *args], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)
    except OSError:
        return None
    try:
        if limit is None:
            out, _ = proc.communicate(timeout=GIT_TIMEOUT_S)
        else:
            assert proc.stdout is not None
            watchdog = threading.Timer(GIT_TIMEOUT_S, proc.kill)  # a read has no timeout of its own
            watchdog.start()
            try:
                out = proc.stdout.read(limit + 1)
            finally:
                watchdog.cancel()
            if len(out) > limit:
                proc.kill()  # enough: the rest is cut anyway
            proc.stdout.close()
            proc.wait(GIT_TIMEOUT_S)
            return out
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        log.warning("expman: git %s took over %.0f s; skipped", args[0], GIT_TIMEOUT_S)
        return None
    return out if proc.returncode == 0 else None


def _git_text(args: list[str], cwd: Path) -> str | None:
    out = _git(args, cwd)
    if out is None:
        return None
    text = out.decode("utf-8", "replace").strip()
    return text or None


_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def strip_credentials(url: str) -> str:
    """https://user:token@host/x -> https://host/x (scp-style git@host:x is kept)."""
    return _USERINFO.sub(r"\1", url)


def git_facts(folder: Path, top: str) -> tuple[dict[str, Any], bytes | None]:
    commit = _git_text(["rev-parse", "--verify", "-q", "HEAD"], folder)
    branch = _git_text(["symbolic-ref", "--short", "-q", "HEAD"], folder)
    remote = _git_text(["remote", "get-url", "origin"], folder)
    if remote is None:
        names = (_git_text(["remote"], folder) or "").split()
        remote = _git_text(["remote", "get-url", names[0]], folder) if names else None
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    facts: dict[str, Any] = {
        "root": top,
        "commit": commit,
        "branch": branch,
        "remote": strip_credentials(remote) if remote else None,
        "dirty": bool(status.strip()) if status is not None else None,
        "diff": None,
    }
    diff = None
    if commit:
        raw = _git(["diff", "HEAD", "--no-color", "--no-ext-diff"], folder, limit=DIFF_CAP)
        if raw:
            cut = len(raw) > DIFF_CAP
            diff = raw[:DIFF_CAP] + (b"\n# expman: diff cut at %d bytes\n" % DIFF_CAP if cut else b"")
            facts.update(diff=DIFF_NAME, diff_bytes=len(diff), diff_truncated=cut)
    return facts, diff


# --- folders that are not git checkouts ----------------------------------------------------------


def _is_source(name: str) -> bool:
    if name in SOURCE_NAMES:
        return True
    suffix = os.path.splitext(name)[1].lower()
    return suffix in SOURCE_SUFFIXES


def _walk_sources(capture: CodeCapture, folder: Path, excluded: list[Path]) -> None:
    rules: dict[Path, list[_Rule]] = {}
    for here, dirs, files in os.walk(folder, followlinks=False):
        current = Path(here)
        inherited = rules.get(current.parent, []) if current != folder else []
        active = rules[current] = inherited + _read_gitignore(current, folder)
        kept = []
        for d in sorted(dirs):
            path = current / d
            rel = path.relative_to(folder).as_posix()
            if d in SKIP_DIRS or d.endswith(".egg-info") or path.is_symlink() or _under(path, excluded):
                continue
            if _ignored(active, rel, True):
                continue
            kept.append(d)
        dirs[:] = kept
        for f in sorted(files):
            path = current / f
            rel = path.relative_to(folder).as_posix()
            if not _is_source(f) or _ignored(active, rel, False) or _escapes(path, folder) or not path.is_file():
                continue
            if not capture.add(rel, path):
                return


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _read_gitignore(folder: Path, root: Path) -> list[_Rule]:
    try:
        text = (folder / ".gitignore").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    base = folder.relative_to(root).as_posix()
    base = "" if base == "." else base + "/"
    out = []
    for line in text.splitlines():
        rule = _parse_rule(line, base)
        if rule is not None:
            out.append(rule)
    return out


def _parse_rule(line: str, base: str) -> _Rule | None:
    if not line.strip() or line.startswith("#"):
        return None
    line = line.rstrip(" ") if not line.endswith("\\ ") else line
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    if line.startswith("\\"):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    body = _glob_to_regex(line)
    prefix = re.escape(base) + ("" if anchored else "(?:.*/)?")
    return _Rule(re.compile(f"^{prefix}{body}$"), negate, dir_only)


def _glob_to_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("/.*")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = glob.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                inner = glob[i + 1 : end]
                if inner.startswith("!"):
                    inner = "^" + inner[1:]
                out.append(f"[{inner}]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _ignored(rules: list[_Rule], relative: str, is_dir: bool) -> bool:
    ignored = False
    for rule in rules:
        if rule.dir_only and not is_dir:
            continue
        if rule.regex.match(relative):
            ignored = not rule.negate
    return ignored
