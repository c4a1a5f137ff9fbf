"""A small training script that logs with expman, for torchrun, srun or plain python.

    torchrun --nproc_per_node=4 train.py          # nothing configured: one run, all ranks
    EXPMAN_COLLECTOR=ipc:///run/expman/collector.sock torchrun --nproc_per_node=4 train.py

Every rank calls `start_experiment` the same way. expman reads the launcher's variables
itself (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK and TORCHELASTIC_RUN_ID from torchrun;
SLURM_PROCID, ... from srun), so each point keeps its rank and the ranks of one job land
in one run. This script reads them too, only to print and to seed its fake data. It needs
no torch: the "model" is a formula; the comments show where real training goes.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import expman


def env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="torchrun-demo")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--step-time", type=float, default=0.0, help="seconds of pretend compute per step")
    args = parser.parse_args()

    rank = env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    world_size = env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    # Real training would start here:
    #   torch.distributed.init_process_group("nccl"); torch.cuda.set_device(local_rank)

    with expman.start_experiment(args.experiment, args.name) as exp:
        # The same parameters from every rank merge into one config.yaml.
        exp.log_parameters({"lr": 3e-4, "steps": args.steps, "world_size": world_size})
        rng = random.Random(rank)
        for step in range(args.steps):
            if args.step_time:
                time.sleep(args.step_time)  # forward, backward, optimizer step
            loss = math.exp(-step / 100) + 0.02 * rng.random()
            exp.log_metrics({"loss": loss, "grad_norm": 1.0 + rng.random()}, step=step)
        exp.info(f"rank {rank} of {world_size} (local rank {local_rank}) done")
    # Leaving the with block waited until the collector acknowledged every point.
    print(f"expman: rank {rank} logged {args.steps} steps into {exp.run_dir}", flush=True)


if __name__ == "__main__":
    main()
