"""`start_experiment` and the process-wide plumbing behind it (senders, local collectors, exit)."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expman._errors import ExpmanError, RunNotFoundError
from expman._rank import console
from expman._rank.channel import RunChannel
from expman._rank.experiment import DEFAULT_FINISH_TIMEOUT, Experiment, describe_exception
from expman._env import COLLECTOR_ENV, hostname, software_info
from expman._storage.files import bucket_root, resolve_root
from expman._rank.launcher import Identity, resolve_identity
from expman._rank.local_collector import LocalCollector
from expman._storage.layout import RUN_YAML, read_yaml, run_dir_name
from expman._wire.limits import check_name
from expman._rank.sender import Sender
from expman._rank.values import check_tags, check_world_size

log = logging.getLogger("expman")

DEFAULT_EXPERIMENT = "default"
DEFAULT_HEARTBEAT_INTERVAL = 5.0

_lock = threading.Lock()
_senders: dict[str, Sender] = {}
_local_collectors: dict[tuple[Path, str | None], LocalCollector] = {}
_open_runs: list[Experiment] = []  # started and not yet finished, for the exit hooks
_hooks_installed = False


def start_experiment(
    space: str | None = None,
    name: str | None = None,
    *,
    code_dir: str | os.PathLike[str] | None | bool = None,
    log_hardware: bool = False,
    hardware_interval: float | None = None,
    experiment_uid: str | None = None,
    tags: list[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    collector: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    run_id: str | None = None,
    heartbeat_interval: float | None = None,
    finish_timeout: float = DEFAULT_FINISH_TIMEOUT,
    encrypt_artifacts: bool = False,
    flush_interval: float | None = None,
    max_points_per_frame: int | None = None,
    max_buffer_bytes: int | None = None,
    max_spool_bytes: int | None = None,
    capture_console: bool | None = None,
    _parent: Experiment | None = None,
) -> Experiment:
    """Start (or, with `experiment_uid`, reopen) a run and return its Experiment.

    `space` is the experiment (a folder under the root), `name` the run's name. Every
    rank of a launched job (torchrun, Slurm, MPI) lands in the same run without talking
    to the others: see expman/_env.py for how rank and run id are found. With no
    `collector` argument and no $EXPMAN_COLLECTOR, a local collector process is started
    (one per process, or one shared by the job's ranks on this host).
    `log_hardware=True` asks the host's collector to sample the host, this process and its
    GPUs every `hardware_interval` seconds (default: the collector's setting, 1 s) while
    the run is active (see docs/storage.md, "Hardware").
    `code_dir` names the code to store under `code/` (default: the launching script and
    git facts; False: nothing). `encrypt_artifacts` has the collector encrypt this run's
    artifacts with its master key (`expman keys init`).
    `max_buffer_bytes` (default $EXPMAN_MAX_BUFFER_BYTES, else 256 MiB) bounds the frames
    kept in memory until the collector confirms them; past it they spill to a spool file
    of at most `max_spool_bytes` (default $EXPMAN_MAX_SPOOL_BYTES, else 1 GiB) under
    $EXPMAN_SPOOL_DIR (default $XDG_STATE_HOME/expman/spool); see docs/reliability.md.
    `root` may be object storage (`s3://bucket/prefix`, docs/storage.md, "Runs in a bucket"):
    the collector stages the run on local disk and uploads it; `run_dir` is then that
    staging folder, and the run is read back with `expman.open_run` from the URI.
    `capture_console` (default on, unless $EXPMAN_CONSOLE=off) copies what the process
    prints to stdout and stderr into the run's run.log, each line with its rank and stream
    (`Run.console()`); prints still reach the terminal as before and never wait.
    """
    # Object storage (s3://...): the collector stages the run on local disk and uploads it.
    root_path: Path | str = bucket_root(root) or resolve_root(root)
    endpoint = collector or os.environ.get(COLLECTOR_ENV) or None
    if _parent is not None and run_id is None:
        run_id = _parent.child_run_id(name)  # every rank derives the same child id
    identity = resolve_identity(rank, world_size, run_id)
    check_world_size(identity.world_size)
    names = _name_run(root_path, identity, space, name, experiment_uid, must_exist=endpoint is None)
    tag_list = check_tags(tags)
    hardware = _hardware_hello(log_hardware, hardware_interval)
    heartbeat = _heartbeat_interval(heartbeat_interval)
    local = None
    if endpoint is None:
        local = _local_for(root_path, identity, names.uid, encrypt_artifacts)
        endpoint = local.endpoint
    sender = _sender_for(endpoint, local)
    sender.tune(flush_interval, max_points_per_frame, max_buffer_bytes, max_spool_bytes)
    _install_exit_hooks()
    hello = _hello(names, root_path, _parent, tag_list, identity, heartbeat, hardware)
    # A private collector writes under our own root, so the folder is known now; a separate
    # one names it in its answer to the hello (Experiment.run_dir).
    known_dir = None
    if local is not None and isinstance(root_path, Path):
        known_dir = root_path / names.experiment / run_dir_name(names.run, names.uid)
    channel = RunChannel(uid=names.uid, host=hostname(), rank=identity.rank, root=root_path, hello=hello,
                         heartbeat_interval=heartbeat, run_dir=known_dir)
    channel.artifacts.encrypt = bool(encrypt_artifacts)
    exp = Experiment(channel=channel, sender=sender, experiment=names.experiment, name=names.run,
                     world_size=identity.world_size, parent=hello["parent"], tags=tag_list,
                     finish_timeout=finish_timeout, start_child=start_experiment)
    with _lock:
        _open_runs[:] = [e for e in _open_runs if not e.finishing]
        _open_runs.append(exp)
    if _parent is None and console.wanted(capture_console):
        console.attach(channel)
    if code_dir is True:
        code_dir = None
    if code_dir is not False and exp.rank == 0 and (_parent is None or code_dir is not None):
        from expman._rank.logged_files import capture_code

        capture_code(channel, sender, code_dir)  # type: ignore[arg-type]
    return exp


def _hello(names: _RunNames, root: Path | str, parent: Experiment | None, tags: list[str], identity: Identity,
           heartbeat: float, hardware: dict[str, Any]) -> dict[str, Any]:
    """The hello frame's body: everything the collector needs to open (or reopen) the run
    for this rank; sent first and again after a collector restart (docs/protocol.md)."""
    return {
        "experiment": names.experiment,
        "name": names.run,
        "dir": run_dir_name(names.run, names.uid),
        "root": str(root),
        "reopen": names.reopen,
        "parent": parent.uid if parent is not None else None,
        "tags": tags,
        "world_size": identity.world_size,
        "pid": os.getpid(),
        "started_at": time.time(),
        "heartbeat_interval": heartbeat,
        "software": software_info(),
        **_launch_info(identity),
        **hardware,
    }


@dataclass(frozen=True)
class _RunNames:
    experiment: str
    run: str
    uid: str
    reopen: bool


def _name_run(root: Path | str, identity: Identity, space: str | None, name: str | None, experiment_uid: str | None,
              must_exist: bool) -> _RunNames:
    """The run's experiment, name and id: a reopened run's own, else the arguments', else
    ones every rank of the job derives alike."""
    reopen = experiment_uid is not None
    if reopen:
        if isinstance(root, str):
            raise ExpmanError("reopening a run (experiment_uid=) is not supported yet when the root is object storage")
        space, name = _find_existing(root, str(experiment_uid), space, name, must_exist=must_exist)
        uid = str(experiment_uid)
    else:
        uid = check_name("run id", identity.run_id)
    if name is None:  # ranks of one job must pick the same name, so only a lone process uses the clock
        name = time.strftime("run-%Y%m%d-%H%M%S") if identity.run_id_source == "fresh" else identity.launch.job_label or "run"
    experiment = check_name("experiment", space if space is not None else DEFAULT_EXPERIMENT)
    return _RunNames(experiment, check_name("run", name), uid, reopen)


def _local_for(root: Path | str, identity: Identity, uid: str, encrypt_artifacts: bool) -> LocalCollector:
    """The private collector for this root: one per process, or one per job, host and root
    when the job's ranks share a run."""
    if encrypt_artifacts:  # the local collector reads the same key file: say now if there is none
        from expman._storage.crypto import check_key_file

        check_key_file()
    shared_key = None
    if identity.world_size > 1 and identity.run_id_source != "fresh":
        shared_key = f"{uid}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    return _local_collector(root, shared_key)


def _heartbeat_interval(value: float | None) -> float:
    if value is None:
        value = float(os.environ.get("EXPMAN_HEARTBEAT_INTERVAL") or DEFAULT_HEARTBEAT_INTERVAL)
    if not value > 0:
        raise ValueError(f"heartbeat_interval must be positive seconds, got {value!r}")
    return float(value)


def _launch_info(identity: Identity) -> dict[str, Any]:
    launch = identity.launch
    return {
        "launcher": launch.launcher,
        "job": launch.job_label,
        "local_rank": launch.local_rank,
        "node_rank": launch.node_rank,
        "run_id_source": identity.run_id_source,
    }


def _hardware_hello(log_hardware: bool, interval: float | None) -> dict[str, Any]:
    """Hello fields the collector needs to sample this rank's hardware and attribute GPUs
    (the local rank is among the launch fields)."""
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise ValueError(f"hardware_interval must be a positive number of seconds, got {interval!r}")
        interval = float(interval)
    return {
        "log_hardware": bool(log_hardware),
        "hardware_interval": interval,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvidia_visible_devices": os.environ.get("NVIDIA_VISIBLE_DEVICES"),  # in containers
    }


def _find_existing(root: Path, uid: str, space: str | None, name: str | None, must_exist: bool) -> tuple[str, str]:
    for run_yaml in root.glob(f"*/*-{uid}/{RUN_YAML}"):
        info = read_yaml(run_yaml)
        if info.get("id") == uid:
            return info.get("experiment", run_yaml.parent.parent.name), info.get("name", name or uid)
    if must_exist:
        raise RunNotFoundError(f"no run with id {uid!r} under {root}")
    return space or DEFAULT_EXPERIMENT, name or uid


def _local_collector(root: Path | str, shared_key: str | None) -> LocalCollector:
    with _lock:
        local = _local_collectors.get((root, shared_key))
        if local is None:
            local = _local_collectors[(root, shared_key)] = LocalCollector(root, shared_key)
        else:
            local.ensure_running()
        return local


def _sender_for(endpoint: str, local: LocalCollector | None) -> Sender:
    with _lock:
        sender = _senders.get(endpoint)
        if sender is None:
            sender = _senders[endpoint] = Sender(endpoint, on_idle_check=local.ensure_running if local else None)
        return sender


def active_experiments() -> list[Experiment]:
    """Runs started in this process and not finished yet."""
    with _lock:
        return [exp for exp in _open_runs if not exp.finishing]


def _finish_all(status: str, error: dict[str, str] | None = None, timeout: float | None = None) -> None:
    # Children first, so a parent's finish does not wait on them twice.
    for exp in sorted(active_experiments(), key=lambda e: e.parent is None):
        try:
            exp.finish(status, timeout, error=error)
        except Exception:
            log.exception("expman: could not finish run %s", exp.uid)


def shutdown(status: str = "finished") -> None:
    """Finish every open run (with `status`), then stop expman's background threads and
    the local collectors it started.

    It runs by itself at interpreter exit, so most scripts never call it. Call it when the
    process lives on after training and you want everything delivered and released now:
    a notebook or service between runs, before `os.fork()`, or before a final step that
    must not share the machine with expman's threads. Each run waits at most its
    `finish_timeout`; a later `start_experiment` starts afresh.
    """
    _finish_all(status)
    from expman._rank.artifacts import stop_all

    stop_all()
    with _lock:
        senders = list(_senders.values())
        locals_ = list(_local_collectors.values())
        _senders.clear()
        _local_collectors.clear()
    for sender in senders:
        sender.stop()
    for local in locals_:
        local.shutdown()


def _forget_after_fork() -> None:
    """In a forked child: the parent's sender threads, collectors and runs are the parent's.

    The child starts with none of them (its own start_experiment() gets its own sender),
    the runs it inherited drop what it logs into them with one warning, and its exit does
    not wait on deliveries that no thread of its own would ever make."""
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    inherited = list(_open_runs)
    _open_runs.clear()
    _senders.clear()
    _local_collectors.clear()  # the parent's: never shut down from here
    for exp in inherited:
        exp._inherited_by_fork()


os.register_at_fork(after_in_child=_forget_after_fork)


def _install_exit_hooks() -> None:
    """Interpreter exit finishes open runs; an uncaught exception marks them failed;
    SIGTERM marks them killed (only if nobody else handles SIGTERM)."""
    global _hooks_installed
    with _lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    atexit.register(shutdown)

    previous_hook = sys.excepthook

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        status = "killed" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        _finish_all(status, describe_exception(exc))
        previous_hook(exc_type, exc, tb)

    sys.excepthook = excepthook

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:

        def on_sigterm(signum: int, frame: Any) -> None:
            _finish_all("killed", {"type": "SIGTERM", "message": "terminated by SIGTERM", "traceback": ""}, 10.0)
            shutdown()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)
