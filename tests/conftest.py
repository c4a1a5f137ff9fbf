"""Fixtures that start real collector processes and real training scripts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml
from _helpers import wait_for


@pytest.fixture
def key_file(tmp_path, monkeypatch) -> Path:
    """An artifact master key in a temp folder, named by EXPMAN_KEY_FILE."""
    from expman._storage.crypto import create_key_file

    path = tmp_path / "keys" / "master.key"
    create_key_file(path)
    monkeypatch.setenv("EXPMAN_KEY_FILE", str(path))
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temp path: ipc:// socket paths must stay under ~100 characters."""
    path = Path(tempfile.mkdtemp(prefix="em-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


@dataclass
class CollectorProcess:
    proc: subprocess.Popen
    endpoint: str
    root: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM, wait, SIGKILL as a last resort; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_collector(root: Path, workdir: Path, bind: str | None = None, *extra: str,
                    program: list[str] | None = None) -> CollectorProcess:
    """A real collector process, ready. `program`: the command that runs the daemon
    (default `python -m expman.collector`; tests/_enospc_collector.py plays a full disk)."""
    ready = workdir / f"ready-{time.monotonic_ns()}.yaml"
    log_path = workdir / f"collector-{time.monotonic_ns()}.log"
    bind = bind or f"ipc://{workdir}/c.sock"
    cmd = [*(program or [sys.executable, "-m", "expman.collector"]), "--root", str(root), "--bind", bind,
           "--ready-file", str(ready), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"))
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the collector to report ready")
    except AssertionError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise AssertionError(f"collector exited with {proc.returncode}: {log_path.read_text()}")
    endpoint = yaml.safe_load(ready.read_text())["endpoints"][0]
    return CollectorProcess(proc, endpoint, root, log_path)


@pytest.fixture
def collector(root: Path, short_dir: Path) -> Iterator[CollectorProcess]:
    """A real expman-collector process on an ipc socket; stopped and checked at teardown."""
    c = start_collector(root, short_dir)
    yield c
    assert c.stop() == 0, c.log()


@pytest.fixture
def run_script(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a Python training script in a fresh interpreter (so exit hooks run for real)."""

    def run(source: str, *, timeout: float = 60, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
        script = tmp_path / f"script_{time.monotonic_ns()}.py"
        script.write_text(textwrap.dedent(source))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"script failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run


@pytest.fixture(autouse=True)
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's spool (frames the collector has not confirmed) lives in its own folder,
    never in the user's ~/.local/state; scripts started by the test inherit it."""
    path = tmp_path / "spool"
    monkeypatch.setenv("EXPMAN_SPOOL_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _release_expman(spool_dir: Path) -> Iterator[None]:
    """Each test leaves no open runs, sender threads or local collector processes behind.
    (It asks for spool_dir so it is torn down first: a run a failed test left open spools
    its last frames into the test's folder, not into ~/.local/state.)"""
    yield
    from expman._rank import start as _api

    _api.shutdown()


@dataclass
class S3Server:
    """A real S3-protocol server (moto) on loopback."""

    proc: subprocess.Popen
    endpoint: str  # host:port
    log_path: Path

    def filesystem(self) -> object:
        """A pyarrow S3FileSystem on this server (it may create buckets)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", access_key="test",
                                 secret_key="test", region="us-east-1", allow_bucket_creation=True)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server as a subprocess on 127.0.0.1 (port 0: it reports the one it got),
    with the AWS environment pointed at it for the module: endpoint, dummy keys, no
    ~/.aws files and no instance-metadata lookups, so nothing leaves loopback."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    workdir = tmp_path_factory.mktemp("s3")
    log_path = workdir / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(proc, "", log_path)
    try:
        found = wait_for(lambda: re.search(r"Running on http://(127\.0\.0\.1:\d+)", log_path.read_text())
                         or proc.poll() is not None, 30, "moto's S3 server to listen")
        if proc.poll() is not None:
            raise AssertionError(f"moto_server exited with {proc.returncode}: {log_path.read_text()}")
        server.endpoint = found[1]
        with pytest.MonkeyPatch.context() as env:
            for name, value in {
                "AWS_ENDPOINT_URL": f"http://{server.endpoint}", "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(workdir / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-credentials"),
            }.items():
                env.setenv(name, value)
            env.delenv("AWS_PROFILE", raising=False)
            env.delenv("AWS_SESSION_TOKEN", raising=False)
            yield server
    finally:
        server.stop()


# End-to-end modules: several real processes (collector restarts, torchrun, Lightning DDP),
# a real terminal (tmux), network namespaces, a Jupyter kernel, an S3-protocol server, a web
# server. `pytest -m "not e2e"` runs the rest: the fast subset for a quick check.
E2E = {
    "test_multihost", "test_distributed", "test_concurrent", "test_hostile", "test_soak", "test_curve_refusals",
    "test_integrations_lightning", "test_integrations_transformers",
    "test_tui_tmux", "test_tui_serve", "test_tui_media", "test_notebook", "test_objstore", "test_lifecycle", "test_deploy",
    "test_kill_drain",
    "test_tui_bucket", "test_bucket",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in E2E:
            item.add_marker(pytest.mark.e2e)
