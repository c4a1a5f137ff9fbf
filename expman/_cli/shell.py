"""How the commands we print should start, so that they work pasted into the user's shell.

README's first command runs `.venv/bin/expman demo` without activating the venv: plain
`expman` is then not on PATH (or is another installation's), and plain `python` lacks our
dependencies. So printed commands name this installation's programs by the shortest path
that reaches them, unless PATH already finds exactly these.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def _short(path: Path) -> str:
    """`path` relative to the working folder when inside it (`.venv/bin/expman`), else absolute."""
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return shlex.quote(str(path))
    text = str(relative)
    return shlex.quote(text if text.startswith(".") else f"./{text}")


def _found_here(name: str) -> bool:
    found = shutil.which(name)
    return found is not None and Path(found).parent.resolve() == _bin_dir().resolve()  # python is a symlink


def program(name: str) -> str:
    """How to run our console script `name` (expman, expman-collector, expman-tui)."""
    script = _bin_dir() / name
    if _found_here(name) or not script.exists() and shutil.which(name):
        return name
    if script.exists():
        return _short(script)
    module = {"expman": "expman", "expman-collector": "expman.collector", "expman-tui": "expman.tui"}[name]
    return f"{python()} -m {module}"


def python() -> str:
    """How to run the Python that has expman installed."""
    return "python" if _found_here("python") else _short(Path(sys.executable))


def activate_hint() -> str | None:
    """`source .venv/bin/activate` when that would make the plain names work, else None."""
    activate = _bin_dir() / "activate"
    if not activate.exists() or (_found_here("expman") and _found_here("python")):
        return None
    return f"source {_short(activate)}"
