"""Run ids that every rank of a job derives alike, for adapters that start their run lazily.

A framework adapter is built in every rank's process before training starts, and each
must name the same run without talking to the others. The order, first match wins:

1. `run_id=` given to the adapter, then $EXPMAN_RUN_ID (the user chose).
2. A job seed: the launcher's job id when a launcher we know started the ranks (torchrun,
   Slurm, MPI: see expman/_env.py); the seed of our parent when we are a rank that
   Lightning's DDP launcher started (it runs the script again as children of rank 0 with
   rank 0's environment and LOCAL_RANK=1..N-1, so rank 0 exports its seed in
   $EXPMAN_ADAPTER_JOB as "<pid>:<seed>" before it launches them); else a fresh one.

The n-th adapter a process builds (from 0) gets the seed itself, then sha256("<seed>/<n>"):
the ranks run the same script, so they build their adapters in the same order, and two
Trainers in one script get two runs.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Mapping

from expman._env import RUN_ID_ENV
from expman._rank.launcher import detect_launch, new_uid

JOB_ENV = "EXPMAN_ADAPTER_JOB"

_lock = threading.Lock()
_seed: str | None = None
_count = 0


def adapter_run_id(explicit: str | None = None) -> str:
    """The run id for the adapter being built now (see the module docstring)."""
    global _seed, _count
    if explicit is not None:
        return str(explicit)
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    with _lock:
        if _seed is None:
            _seed = job_seed(os.environ, os.getppid())
            os.environ[JOB_ENV] = f"{os.getpid()}:{_seed}"  # for the ranks Lightning will start as our children
        n, _count = _count, _count + 1
    return _seed if n == 0 else hashlib.sha256(f"{_seed}/{n}".encode()).hexdigest()[:12]


def job_seed(env: Mapping[str, str], ppid: int) -> str:
    """The job's seed as seen from a process with this environment and parent pid."""
    parent, _, seed = env.get(JOB_ENV, "").partition(":")
    if seed and parent == str(ppid) and env.get("LOCAL_RANK", "0") not in ("", "0"):
        return seed  # a rank that Lightning's launcher started: rank 0 is our parent
    derived = detect_launch(env).derived_run_id
    return derived if derived is not None else new_uid()
