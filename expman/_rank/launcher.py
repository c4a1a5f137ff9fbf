"""Who is logging: host, launcher, rank, and which run a job's ranks agree on.

Order (first match wins for each field):
- rank / world size: the `rank=` / `world_size=` arguments, then EXPMAN_RANK /
  EXPMAN_WORLD_SIZE, then the launcher's variables (torchrun, then Slurm, then Open MPI,
  then MPICH/PMI, then PyTorch Lightning's own DDP launcher on one node), else 0 and 1.
- run id: the `run_id=` argument, then EXPMAN_RUN_ID, then an id derived from the
  launcher's job identity (the same in every rank of one launch, different in the next),
  else a fresh random id.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from expman._env import RUN_ID_ENV, hostname


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process about itself and its job."""

    launcher: str  # torchrun, slurm, openmpi, pmi, lightning, or none
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    job: str | None = None  # the same string in every rank of one launch, None if unknown
    job_label: str | None = None  # a short readable form of it, for default run names

    @property
    def derived_run_id(self) -> str | None:
        if self.job is None:
            return None
        return hashlib.sha256(self.job.encode()).hexdigest()[:12]


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _parent_identity() -> str:
    """The launching agent (our parent) by pid and start time: shared by the ranks it started."""
    return _process_identity(os.getppid())


def _process_identity(pid: int) -> str:
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{hostname()}:{pid}:{start}"


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read the launcher's variables (see the module docstring for the order).

    One branch per launcher, in the order they are tried, so the whole rule reads top to
    bottom in one place; that makes it longer than most functions here."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "RANK" in env and "WORLD_SIZE" in env):
        run = env.get("TORCHELASTIC_RUN_ID", "none")
        restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        if run and run != "none":
            job, label = f"torchrun:{run}:{restart}", f"torchrun-{run[:24]}"
        elif "SLURM_JOB_ID" in env:
            job = f"torchrun:slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}:{env.get('SLURM_RESTART_COUNT', '0')}:{restart}"
            label = f"torchrun-{env['SLURM_JOB_ID']}"
        else:  # plain single-node torchrun: the elastic agent is every local rank's parent
            job, label = f"torchrun:agent:{_parent_identity()}:{restart}", "torchrun"
        return Launch(
            "torchrun",
            rank=_int(env, "RANK", 0),
            local_rank=_int(env, "LOCAL_RANK", 0),
            world_size=_int(env, "WORLD_SIZE", 1),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
            node_rank=_int(env, "GROUP_RANK", 0),
            job=job,
            job_label=label,
        )
    if "SLURM_PROCID" in env:
        job_id, step = env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID", "0")
        restart = env.get("SLURM_RESTART_COUNT", "0")  # a requeued job is a new run
        return Launch(
            "slurm",
            rank=_int(env, "SLURM_PROCID", 0),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=_int(env, "SLURM_NTASKS", 1),
            local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", 1) if env.get("SLURM_NTASKS_PER_NODE", "").isdigit() else 1,
            node_rank=_int(env, "SLURM_NODEID", 0),
            job=f"slurm:{job_id}.{step}:{restart}" if job_id else None,
            job_label=f"slurm-{job_id}.{step}" if job_id else None,
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        namespace = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid")
        return Launch(
            "openmpi",
            rank=_int(env, "OMPI_COMM_WORLD_RANK", 0),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
            world_size=_int(env, "OMPI_COMM_WORLD_SIZE", 1),
            local_world_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1),
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", 0),
            job=f"openmpi:{namespace}" if namespace else f"openmpi:agent:{_parent_identity()}",
            job_label="mpi",
        )
    if "PMI_RANK" in env:
        return Launch(
            "pmi",
            rank=_int(env, "PMI_RANK", 0),
            local_rank=_int(env, "MPI_LOCALRANKID", 0),
            world_size=_int(env, "PMI_SIZE", 1),
            local_world_size=_int(env, "MPI_LOCALNRANKS", 1),
            job=f"pmi:agent:{_parent_identity()}",
            job_label="mpi",
        )
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env and "MASTER_PORT" in env and env.get("NODE_RANK") == "0":
        # Lightning's DDP launcher (`python train.py`, one node): rank 0 sets these (no RANK)
        # and starts ranks 1..N-1 as its children, so the job is rank 0's process.
        local = _int(env, "LOCAL_RANK", 0)
        world = _int(env, "WORLD_SIZE", 1)
        rank0 = _process_identity(os.getpid() if local == 0 else os.getppid())
        return Launch("lightning", rank=local, local_rank=local, world_size=world, local_world_size=world,
                      job=f"lightning:{rank0}", job_label="lightning")
    return Launch("none")


@dataclass(frozen=True)
class Identity:
    """This rank's place in its run, after arguments and EXPMAN_* overrides."""

    launch: Launch
    rank: int
    world_size: int
    run_id: str
    run_id_source: str  # argument, env, launcher, or fresh


def resolve_identity(
    rank: int | None = None,
    world_size: int | None = None,
    run_id: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Identity:
    env = os.environ if env is None else env
    launch = detect_launch(env)
    final_rank = int(rank) if rank is not None else _int(env, "EXPMAN_RANK", launch.rank)
    final_world = int(world_size) if world_size is not None else _int(env, "EXPMAN_WORLD_SIZE", launch.world_size)
    if final_rank < 0 or final_world < 1 or final_rank >= final_world:
        raise ValueError(
            f"rank {final_rank} is not below world size {final_world}: pass world_size= (or set EXPMAN_WORLD_SIZE)"
        )
    if run_id is not None:
        chosen, source = str(run_id), "argument"
    elif env.get(RUN_ID_ENV):
        chosen, source = env[RUN_ID_ENV], "env"
    elif launch.derived_run_id is not None:
        chosen, source = launch.derived_run_id, "launcher"
    else:
        chosen, source = new_uid(), "fresh"
    return Identity(launch, final_rank, final_world, chosen, source)


def new_uid() -> str:
    """A fresh run id: 12 hex characters, the length of child run ids too."""
    return secrets.token_hex(6)


