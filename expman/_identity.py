"""Who is logging: host, process, rank, and where runs go by default."""

from __future__ import annotations

import os
import platform
import secrets
import socket
import sys
from pathlib import Path

ROOT_ENV = "EXPMAN_ROOT"
COLLECTOR_ENV = "EXPMAN_COLLECTOR"
DEFAULT_ROOT = "experiments"

# First variable found wins; EXPMAN_* overrides the launchers'.
_RANK_VARS = ("EXPMAN_RANK", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_WORLD_VARS = ("EXPMAN_WORLD_SIZE", "WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


def hostname() -> str:
    return socket.gethostname()


def new_uid() -> str:
    return secrets.token_hex(4)


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        raw = os.environ.get(name)
        if raw not in (None, ""):
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    return default


def detect_rank() -> int:
    return _first_int(_RANK_VARS, 0)


def detect_world_size() -> int:
    return _first_int(_WORLD_VARS, 1)


def detect_local_rank() -> int:
    """The rank within this host (torchrun, Slurm, Open MPI), 0 if none is set or it is not a number."""
    try:
        return max(_first_int(_LOCAL_RANK_VARS, 0), 0)
    except ValueError:
        return 0


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """The `root` argument, else $EXPMAN_ROOT, else ./experiments; always absolute."""
    chosen = root if root is not None else os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    return Path(chosen).expanduser().resolve()


def software_info() -> dict[str, str]:
    from ._version import __version__

    return {
        "expman": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "argv": " ".join(sys.argv),
        "cwd": os.getcwd(),
    }
