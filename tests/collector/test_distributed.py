"""Many ranks, one run: launcher environments, a shared local collector, real torchrun."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import expman
from expman._rank.launcher import detect_launch, resolve_identity
from _helpers import wait_for

POINTS = 2000

RANK_SCRIPT = """
import os, sys, expman
exp = expman.start_experiment("dist", root=sys.argv[1])
exp.log_parameters({"lr": 0.1, "rank_seed": exp.rank})
for step in range(int(sys.argv[2])):
    exp.log_metric("loss", float(step + exp.rank), step=step)
exp.info(f"rank {exp.rank} done")
print(exp.run_dir, flush=True)
if len(sys.argv) > 3 and int(sys.argv[3]) == exp.rank:
    import time
    while exp.stats()["acked"] < int(sys.argv[2]):
        time.sleep(0.01)
    os.kill(os.getpid(), 9)  # this rank vanishes without finishing
exp.finish()
"""


def launch(tmp_path: Path, envs: list[dict[str, str]], root: Path, points: int = POINTS, kill_rank: int = -1) -> list[str]:
    """Start one process per env (as a launcher would), wait, return each one's run dir."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EXPMAN_", "SLURM_", "OMPI_", "PMI_"))}
    base.pop("RANK", None)
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(points), str(kill_rank)],
                              env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for env in envs]
    dirs = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode in (0, -9), err
        dirs.append(out.strip())
    return dirs


def assert_every_point_once(run: expman.Run, world: int, points: int = POINTS) -> None:
    table = run.metrics("loss")
    for rank in range(world):
        steps = sorted(table.filter(table["rank"].to_numpy() == rank)["step"].to_pylist())
        assert steps == list(range(points)), f"rank {rank}: {len(steps)} points"


def torchrun_env(rank: int, world: int, run_id: str) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": run_id, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def slurm_env(rank: int, world: int, job: str, restart: int = 0) -> dict[str, str]:
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(world), "SLURM_NODEID": "0",
            "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": str(restart)}


def test_launcher_detection_and_run_id_agreement():
    t = detect_launch(torchrun_env(3, 8, "abc"))
    assert (t.launcher, t.rank, t.local_rank, t.world_size) == ("torchrun", 3, 3, 8)
    s = detect_launch(slurm_env(5, 16, "777"))
    assert (s.launcher, s.rank, s.world_size, s.job_label) == ("slurm", 5, 16, "slurm-777.0")
    o = detect_launch({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                       "PMIX_NAMESPACE": "prterun-x-1@1"})
    assert (o.launcher, o.rank, o.world_size) == ("openmpi", 2, 4)
    p = detect_launch({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (p.launcher, p.rank, p.world_size) == ("pmi", 1, 2)
    # Every rank of one job derives the same run; another job, or a requeue, another one.
    ids = {resolve_identity(env=slurm_env(r, 4, "777")).run_id for r in range(4)}
    assert len(ids) == 1
    assert resolve_identity(env=slurm_env(0, 4, "778")).run_id not in ids
    assert resolve_identity(env=slurm_env(0, 4, "777", restart=1)).run_id not in ids
    # Order: argument > EXPMAN_* > launcher.
    env = {**slurm_env(1, 4, "777"), "EXPMAN_RUN_ID": "mine", "EXPMAN_RANK": "2"}
    ident = resolve_identity(env=env)
    assert (ident.run_id, ident.run_id_source, ident.rank) == ("mine", "env", 2)
    ident = resolve_identity(rank=3, run_id="given", env=env)
    assert (ident.run_id, ident.rank, ident.world_size) == ("given", 3, 4)
    assert resolve_identity(env={}).run_id_source == "fresh"
    with pytest.raises(ValueError, match="world size"):
        resolve_identity(rank=4, env=slurm_env(0, 4, "1"))


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_ranks_with_nothing_configured_share_one_collector_and_one_run(launcher, tmp_path, root):
    job = uuid.uuid4().hex[:10]
    world = 4
    envs = [torchrun_env(r, world, job) if launcher == "torchrun" else slurm_env(r, world, job) for r in range(world)]
    dirs = launch(tmp_path, envs, root)
    assert len(set(dirs)) == 1, dirs
    run = expman.open_run(dirs[0])
    assert run.status == "finished"
    assert sorted(run.info["ranks"]) == list(range(world))
    assert all(r["status"] == "finished" for r in run.info["ranks"].values())
    assert_every_point_once(run, world)
    assert run.params["lr"] == 0.1 and run.params["rank_seed"] == 0
    assert set(run.info["param_conflicts"]["rank_seed"]) == set(range(world))
    assert run.info["launcher"] == launcher
    log = run.log_text()
    assert all(f"rank {r} done" in log for r in range(world))
    assert len(list(root.glob("dist/*"))) == 1
    job_dir = next(Path(p) for p in Path(expman._rank.local_collector.runtime_dir()).glob("job-*") if run.id in p.name)
    pid = int((job_dir / "pid").read_text())  # one collector served every rank
    os.kill(pid, signal.SIGTERM)


def test_ranks_with_a_collector_already_running(tmp_path, root, collector):
    world = 3
    job = uuid.uuid4().hex[:10]
    envs = [{**slurm_env(r, world, job), "EXPMAN_COLLECTOR": collector.endpoint} for r in range(world)]
    dirs = launch(tmp_path, envs, root)
    run = expman.open_run(dirs[0])
    assert len(set(dirs)) == 1 and run.status == "finished"
    assert_every_point_once(run, world)


def test_a_killed_rank_is_lost_and_the_run_crashed(tmp_path, root):
    world = 3
    job = uuid.uuid4().hex[:10]
    envs = [{**torchrun_env(r, world, job), "EXPMAN_HEARTBEAT_INTERVAL": "0.5"} for r in range(world)]
    dirs = launch(tmp_path, envs, root, kill_rank=1)
    run_dir = next(d for d in dirs if d)
    wait_for(lambda: expman.open_run(run_dir).status == "crashed", 10, "the run to turn crashed")
    run = expman.open_run(run_dir)
    states = {r: v["status"] for r, v in run.info["ranks"].items()}
    assert states == {0: "finished", 1: "lost", 2: "finished"}
    assert_every_point_once(run, world)


def test_reduce_across_ranks_and_rank_stats(root):
    exps = [expman.start_experiment("e", "reduce", root=root, run_id="reduce-job", rank=r, world_size=3) for r in range(3)]
    for rank, exp in enumerate(exps):
        for step in range(10 if rank < 2 else 4):  # rank 2 straggles
            exp.log_metric("loss", float(rank * 10 + step), step=step, timestamp=1000.0 + step)
    for exp in exps:
        exp.finish()
    run = expman.open_run(exps[0].run_dir)
    mean = run.metrics("loss", reduce="mean")
    assert mean["step"].to_pylist() == list(range(10))
    assert mean["value"].to_pylist()[:4] == [10.0 + s for s in range(4)]  # (0 + 10 + 20) / 3 + step
    assert mean["ranks"].to_pylist() == [3] * 4 + [2] * 6
    assert run.metrics("loss", reduce="max")["value"].to_pylist()[0] == 20.0
    assert run.metrics("loss", reduce="min")["value"].to_pylist()[0] == 0.0
    assert run.metrics("loss", reduce="median")["value"].to_pylist()[0] == 10.0
    assert set(run.metrics("loss", ranks=[2])["rank"].to_pylist()) == {2}
    with pytest.raises(ValueError, match="reduce"):
        run.metrics(reduce="sum")
    stats = {row["rank"]: row for row in run.rank_stats().to_pylist()}
    assert stats[2]["lag_steps"] == 6 and stats[0]["lag_steps"] == 0
    assert stats[0]["steps_per_s"] == pytest.approx(1.0)
    assert stats[2]["status"] == "finished"


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torch is not installed in this environment (.ci/run installs torch==2.13.0)")
def test_real_torchrun_job_lands_in_one_run(tmp_path, root):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist, expman
        dist.init_process_group("gloo")
        with expman.start_experiment("torchrun", root=sys.argv[1]) as exp:
            assert exp.rank == dist.get_rank() and exp.world_size == dist.get_world_size()
            for step in range(200):
                loss = torch.tensor(1.0 / (step + 1 + exp.rank))
                dist.all_reduce(loss)
                exp.log_metric("loss", loss, step=step)   # a 0-d tensor is a number
        dist.destroy_process_group()
        print(exp.run_dir)
    """))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPMAN_")}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(root)],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = expman.list_runs(root)
    assert len(runs) == 1
    run = runs[0]
    assert run.status == "finished" and sorted(run.info["ranks"]) == [0, 1]
    assert run.info["launcher"] == "torchrun"
    assert_every_point_once(run, 2, 200)
