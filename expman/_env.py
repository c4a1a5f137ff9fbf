"""expman's environment: the EXPMAN_* variables, its folders and this host's name.

The bottom layer: everything may import it, it imports nothing of expman's.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

ROOT_ENV = "EXPMAN_ROOT"
COLLECTOR_ENV = "EXPMAN_COLLECTOR"
RUN_ID_ENV = "EXPMAN_RUN_ID"
HOST_ENV = "EXPMAN_HOST"
DEFAULT_ROOT = "experiments"


def hostname() -> str:
    """$EXPMAN_HOST, else the machine's host name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def chosen_root(root: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    """The `root` argument, else $EXPMAN_ROOT, else ./experiments, as given (readers also
    accept URIs such as s3://bucket/prefix: expman/_storage/files.py)."""
    return root if root is not None else os.environ.get(ROOT_ENV) or DEFAULT_ROOT


def config_dir() -> Path:
    """expman's per-user settings folder: $XDG_CONFIG_HOME/expman, else ~/.config/expman."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "expman"


def software_info() -> dict[str, str]:
    from expman._version import __version__

    return {
        "expman": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "argv": " ".join(sys.argv),
        "cwd": os.getcwd(),
    }
