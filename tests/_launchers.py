"""Stand-ins for `srun` and `torchrun` where the real ones are not installed.

They start the given command once per task with the variables the real launcher sets
(one simulated node), forward SIGTERM and SIGINT to the tasks, and exit with the first
failing task's status. Everything they start is real: bash, the collector, train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

_COMMON = r'''
import os, signal, subprocess, sys

def run_tasks(command, envs):
    procs = [subprocess.Popen(command, env={**os.environ, **env}) for env in envs]
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    sys.exit(next((c for c in codes if c != 0), 0))

def parse(argv, short):
    opts, args = {}, list(argv)
    while args and args[0].startswith("-"):
        a = args.pop(0)
        if a == "--":
            break
        if "=" in a:
            key, value = a.split("=", 1)
            opts[key.replace("_", "-")] = value
        elif a in short:
            opts[short[a]] = args.pop(0)
        else:
            opts[a] = True
    return opts, args
'''

_SRUN = r'''
opts, command = parse(sys.argv[1:], {"-N": "--nodes", "-n": "--ntasks", "-c": "--cpus-per-task"})
nodes = int(opts.get("--nodes", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
if nodes != 1:
    sys.exit("fake srun: simulates one node only")
if "--ntasks" in opts:
    ntasks = int(opts["--ntasks"])
elif "--ntasks-per-node" in opts:
    ntasks = int(opts["--ntasks-per-node"]) * nodes
else:
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
step = str(os.getpid())
run_tasks(command, [{"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_NODEID": "0", "SLURM_NTASKS": str(ntasks),
                     "SLURM_STEP_ID": step, "SLURM_STEP_NUM_TASKS": str(ntasks)} for i in range(ntasks)])
'''

_TORCHRUN = r'''
import uuid
opts, command = parse(sys.argv[1:], {})
n = int(opts.get("--nproc-per-node", "1"))
run_id = opts.get("--rdzv-id") or uuid.uuid4().hex
run_tasks([sys.executable, *command],
          [{"RANK": str(i), "LOCAL_RANK": str(i), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0",
            "ROLE_RANK": str(i), "ROLE_WORLD_SIZE": str(n), "TORCHELASTIC_RUN_ID": run_id,
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"} for i in range(n)])
'''


def install(bin_dir: Path, *names: str) -> Path:
    """Write the stand-ins named (`srun`, `torchrun`) into bin_dir, run by this interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    bodies = {"srun": _SRUN, "torchrun": _TORCHRUN}
    for name in names:
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{_COMMON}\n{bodies[name]}")
        path.chmod(0o755)
    return bin_dir
