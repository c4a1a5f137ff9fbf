"""deploy/: the recipes parse, and the Slurm and torchrun ones really run on this machine."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

import expman
from expman.collector._daemon import load_config, parse_socket_mode
import _launchers
from _helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SBATCH = DEPLOY / "slurm" / "train.sbatch"
RUN_SH = DEPLOY / "torchrun" / "run.sh"
TRAIN_PY = DEPLOY / "torchrun" / "train.py"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml")) + [REPO / "systemd" / "collector.yaml.example"]
SHELL_FILES = sorted(DEPLOY.rglob("*.sh")) + sorted(DEPLOY.rglob("*.sbatch"))


def test_every_recipe_is_explained_in_the_readme():
    readme = (DEPLOY / "README.md").read_text()
    for path in [*DEPLOY.rglob("*.yaml"), *SHELL_FILES, TRAIN_PY]:
        assert str(path.relative_to(DEPLOY)) in readme, f"deploy/README.md does not mention {path.name}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_files_parse(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(path, os.X_OK), f"{path.name} should be executable"
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-S", "warning", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def _k8s(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_daemonset_mounts_the_socket_dir_and_root_from_the_host_and_probes_readiness(tmp_path):
    objs = _k8s("collector-daemonset.yaml")
    assert set(objs) == {"Namespace", "ConfigMap", "DaemonSet"}
    ds = objs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in spec["volumes"]}
    (collector,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in collector["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes), "every mount names a declared volume"
    config = yaml.safe_load(objs["ConfigMap"]["data"]["collector.yaml"])
    # The config the collector reads is the ConfigMap's, and the collector accepts it.
    command = " ".join(collector["command"])
    config_path = "/etc/expman/collector.yaml"
    assert f"--config {config_path}" in command and volumes[mounts["/etc/expman"]]["configMap"]["name"] == "expman-collector"
    cfg_file = tmp_path / "collector.yaml"
    cfg_file.write_text(objs["ConfigMap"]["data"]["collector.yaml"])
    assert load_config(str(cfg_file)) == config
    # The socket's folder and the root are host folders, mounted where the config says.
    (bind,) = config["bind"]
    socket_dir = str(Path(bind[len("ipc://"):]).parent)
    assert volumes[mounts[socket_dir]]["hostPath"]["path"] == socket_dir
    assert volumes[mounts[config["root"]]]["hostPath"]["path"] == config["root"]
    assert parse_socket_mode(config["socket_mode"]) == 0o660
    # Ready once the socket is bound: the ready file (cleared before each start) and the socket.
    probe = " ".join(collector["startupProbe"]["exec"]["command"])
    assert "ready.yaml" in probe and "--ready-file /run/expman/ready.yaml" in command
    assert "rm -f /run/expman/ready.yaml" in command
    assert collector["readinessProbe"]
    assert collector["securityContext"]["runAsNonRoot"] is True


def test_training_pod_mounts_the_socket_dir_and_points_expman_at_it():
    daemonset = _k8s("collector-daemonset.yaml")
    config = yaml.safe_load(daemonset["ConfigMap"]["data"]["collector.yaml"])
    collector_group = daemonset["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsGroup"]
    job = _k8s("training-job-example.yaml")["Job"]
    spec = job["spec"]["template"]["spec"]
    (train,) = spec["containers"]
    env = {e["name"]: e["value"] for e in train["env"]}
    assert env["EXPMAN_COLLECTOR"] == config["bind"][0]
    socket_dir = str(Path(config["bind"][0][len("ipc://"):]).parent)
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in train["volumeMounts"] if m["mountPath"] == socket_dir]
    assert volumes[mount["name"]]["hostPath"]["path"] == socket_dir
    assert collector_group in spec["securityContext"]["supplementalGroups"], "the pod may write to the 0660 socket"


def _bucket_daemonset() -> tuple[dict[str, dict], dict, list[str]]:
    objs = _k8s("collector-daemonset-bucket.yaml")
    spec = objs["DaemonSet"]["spec"]["template"]["spec"]
    (collector,) = spec["containers"]
    return objs, collector, [str(a) for a in collector["args"]]


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_bucket_daemonset_writes_to_a_bucket_named_per_node_with_the_wal_on_the_node():
    objs, collector, args = _bucket_daemonset()
    assert set(objs) == {"Namespace", "Secret", "DaemonSet"}
    ds = objs["DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    # The collector gets its arguments through the shell that clears the ready file.
    assert collector["command"][:2] == ["sh", "-c"] and 'exec expman-collector "$@"' in collector["command"][2]
    assert "rm -f /run/expman/ready.yaml" in collector["command"][2]
    assert _option(args, "--root").startswith("s3://")
    # One name per node: Kubernetes fills $(NODE_NAME) in from the pod's node.
    env = {e["name"]: e for e in collector["env"]}
    assert _option(args, "--name") == "$(NODE_NAME)"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # Credentials from the Secret, as AWS_* variables.
    (source,) = collector["envFrom"]
    secret = objs["Secret"]
    assert source["secretRef"]["name"] == secret["metadata"]["name"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert not [a for a in args if "AWS" in a or "secret" in a.lower()], "no credentials on the command line"
    # The write-ahead log (staging folder) and the socket folder are host folders.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in collector["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    staging = _option(args, "--staging-dir")
    assert volumes[mounts[staging]]["hostPath"]["path"] == staging, "a replaced pod finds what was not uploaded"
    bind = _option(args, "--bind")
    socket_dir = str(Path(bind[len("ipc://"):]).parent)
    assert volumes[mounts[socket_dir]]["hostPath"]["path"] == socket_dir
    assert parse_socket_mode(_option(args, "--socket-mode")) == 0o660
    assert "ready.yaml" in " ".join(collector["startupProbe"]["exec"]["command"])
    assert _option(args, "--ready-file") == "/run/expman/ready.yaml"
    assert collector["securityContext"]["runAsNonRoot"] is True


def test_training_pods_reach_the_bucket_collector_as_they_reach_the_other():
    _objs, collector, args = _bucket_daemonset()
    job = _k8s("training-job-example.yaml")["Job"]
    spec = job["spec"]["template"]["spec"]
    (train,) = spec["containers"]
    env = {e["name"]: e["value"] for e in train["env"]}
    assert env["EXPMAN_COLLECTOR"] == _option(args, "--bind")
    socket_dir = str(Path(_option(args, "--bind")[len("ipc://"):]).parent)
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in train["volumeMounts"] if m["mountPath"] == socket_dir]
    assert volumes[mount["name"]]["hostPath"]["path"] == socket_dir
    assert collector["securityContext"]["runAsGroup"] in spec["securityContext"]["supplementalGroups"]


def _bucket(s3_server, name: str) -> str:
    fs = s3_server.filesystem()
    if fs.get_file_info(name).type == pafs.FileType.NotFound:
        fs.create_dir(name)
    return name


def test_bucket_daemonset_arguments_run_a_collector_that_lands_a_run_in_the_bucket(s3_server, tmp_path, short_dir):
    """The DaemonSet's own arguments (paths moved into temp folders, the bucket moto's),
    on a real collector: a rank pushes to its socket, SIGTERM, and the run is in the bucket."""
    _objs, _collector, args = _bucket_daemonset()
    bucket = _bucket(s3_server, "k8s")
    moved = {"s3://my-bucket/expman": f"s3://{bucket}/expman", "$(NODE_NAME)": "node-a",
             "/var/lib/expman/staging": str(tmp_path / "staging"),
             "ipc:///run/expman/collector.sock": f"ipc://{short_dir}/collector.sock",
             "/run/expman/ready.yaml": str(short_dir / "ready.yaml")}
    assert set(moved) <= set(args), "the recipe's paths changed: update this test"
    argv = [moved.get(a, a) for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "expman.collector", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (short_dir / "ready.yaml").exists() or proc.poll() is not None, 60, "the collector")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        with expman.start_experiment("k8s", "pod", collector=f"ipc://{short_dir}/collector.sock", code_dir=False) as exp:
            for step in range(100):
                exp.log_metric("loss", 1.0 / (step + 1), step=step)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    (run,) = expman.list_runs(f"s3://{bucket}/expman")
    assert run.status == "finished" and run.metrics("loss").num_rows == 100
    parts = s3_server.filesystem().get_file_info(pafs.FileSelector(f"{run.path}/metrics"))
    assert parts and all(p.base_name.endswith(".node-a.parquet") for p in parts), "written under the node's name"


def test_slurm_script_with_a_bucket_root_lands_every_rank_in_the_bucket(s3_server, tmp_path, short_dir):
    bucket = _bucket(s3_server, "slurm")
    bin_dir = _launchers.install(tmp_path / "bin", "srun")
    sock_dir = short_dir / "sock"
    staging = tmp_path / "staging"
    env = _env(bin_dir, SLURM_JOB_ID="4244", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2",
               SLURM_SUBMIT_DIR=str(tmp_path), EXPMAN_ROOT=f"s3://{bucket}/team", EXPMAN_SOCK_DIR=str(sock_dir),
               EXPMAN_STAGING_DIR=str(staging))
    try:
        result = subprocess.run(["bash", str(SBATCH), str(TRAIN_PY), "--steps", "300", "--experiment", "slurm"],
                                capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    finally:
        _no_collector_left(sock_dir)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "signal 15: flushing and exiting" in out
    assert not (tmp_path / "s3:").exists(), "no local folder named after the URI"
    assert staging.is_dir(), "the write-ahead log was staged where EXPMAN_STAGING_DIR says"
    assert _rows_by_rank(f"s3://{bucket}/team") == {0: 300, 1: 300}


# --- the scripts, run for real (launchers stood in for where they are missing) ------------

def _rows_by_rank(root: Path | str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for run in expman.list_runs(root=root):
        for rank in run.metrics(keys=["loss"])["rank"].to_pylist():
            counts[rank] = counts.get(rank, 0) + 1
    return counts


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXPMAN_", "SLURM_"))}
    return {**env, "PATH": path, "PYTHON": sys.executable, **extra}


def _no_collector_left(sock_dir: Path) -> None:
    ready = sock_dir / "ready.yaml"
    if ready.exists():
        pid = yaml.safe_load(ready.read_text())["pid"]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        os.kill(pid, 9)
        raise AssertionError(f"collector {pid} was still running after the script ended")


def test_slurm_script_runs_a_collector_then_the_ranks_then_stops_it(tmp_path, short_dir):
    bin_dir = _launchers.install(tmp_path / "bin", "srun")
    root = tmp_path / "runs"
    sock_dir = short_dir / "sock"
    env = _env(bin_dir, SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2",
               SLURM_SUBMIT_DIR=str(tmp_path), EXPMAN_ROOT=str(root), EXPMAN_SOCK_DIR=str(sock_dir))
    try:
        result = subprocess.run(["bash", str(SBATCH), str(TRAIN_PY), "--steps", "300", "--experiment", "slurm"],
                                capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    finally:
        _no_collector_left(sock_dir)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "signal 15: flushing and exiting" in out, "the collector was stopped cleanly at the end"
    assert "'points': 1200" in out, "the ranks pushed to the node's collector, not to private ones"
    assert not sock_dir.exists(), "the node-local socket folder is removed at the end"
    assert _rows_by_rank(root) == {0: 300, 1: 300}


def test_slurm_script_fails_the_job_when_the_training_step_fails(tmp_path, short_dir):
    bin_dir = _launchers.install(tmp_path / "bin", "srun")
    sock_dir = short_dir / "sock"
    env = _env(bin_dir, SLURM_JOB_ID="4243", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1",
               EXPMAN_ROOT=str(tmp_path / "runs"), EXPMAN_SOCK_DIR=str(sock_dir))
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit(3)\n")
    try:
        result = subprocess.run(["bash", str(SBATCH), str(bad)], capture_output=True, text=True, env=env, timeout=60)
    finally:
        _no_collector_left(sock_dir)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "signal 15: flushing and exiting" in result.stderr


def _torchrun_bin(tmp_path: Path, real: bool) -> Path:
    """The real torchrun when asked for and torch is importable here, else the stand-in."""
    if real and importlib.util.find_spec("torch") is not None and (Path(sys.executable).parent / "torchrun").exists():
        return Path(sys.executable).parent
    return _launchers.install(tmp_path / "bin", "torchrun")


# The plain `torchrun --nproc_per_node=N train.py` gets the real torchrun where torch is
# installed; `own` tests the script's collector lifecycle, for which the stand-in does (and
# saves a few seconds of importing torch).
@pytest.mark.parametrize("mode,real", [("auto", True), ("own", False)])
def test_torchrun_example_lands_every_rank(mode, real, tmp_path):
    root = tmp_path / "runs"
    env = _env(_torchrun_bin(tmp_path, real), NPROC="2", EXPMAN_ROOT=str(root), TMPDIR="/tmp")
    result = subprocess.run(["bash", str(RUN_SH), mode, "--steps", "200"], capture_output=True, text=True,
                            env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("logged 200 steps") == 2
    assert _rows_by_rank(root) == {0: 200, 1: 200}
