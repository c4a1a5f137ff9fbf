"""sd_notify: the protocol against real unix datagram sockets, and the real daemon under it."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import expman
from expman.collector._daemon import load_config, parse_socket_mode
from expman.collector._sdnotify import Notifier, ServiceStatus
from _helpers import wait_for


class Listener:
    """What systemd does: bind a unix datagram socket and read KEY=value messages from it."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def _drain(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append((time.monotonic(), fields))

    def expect(self, key: str, value: str | None = None, timeout: float = 10.0, contains: str | None = None) -> dict[str, str]:
        """The first message not yet returned that sets `key` (to `value`, or containing `contains`)."""
        deadline = time.monotonic() + timeout
        start = getattr(self, "_seen", 0)
        while True:
            for i in range(start, len(self.messages)):
                fields = self.messages[i][1]
                if key in fields and (value is None or fields[key] == value) and (contains is None or contains in fields[key]):
                    self._seen = i + 1
                    return fields
            start = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value or contains or '...'} within {timeout} s; got {[m for _, m in self.messages]}")
            self._drain(min(left, 0.5))

    def drain_queued(self) -> None:
        """Read every message already queued (a local sendto() queues before it returns)."""
        while True:
            count = len(self.messages)
            self._drain(0.01)
            if len(self.messages) == count:
                return

    def times(self, key: str) -> list[float]:
        return [t for t, fields in self.messages if key in fields]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener(short_dir):
    listener = Listener(str(short_dir / "notify.sock"))
    yield listener, str(short_dir / "notify.sock")
    listener.close()


@pytest.fixture
def abstract_listener():
    name = f"expman-test-{secrets.token_hex(6)}"
    listener = Listener(b"\0" + name.encode())
    yield listener, "@" + name
    listener.close()


# --- the protocol ------------------------------------------------------------------------

def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False and n.stopping() is False
    n.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_reach_a_real_datagram_socket(kind, request):
    listener, address = request.getfixturevalue(f"{kind}_listener")
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("listening\non two lines") is True
    assert listener.expect("READY") == {"READY": "1", "STATUS": "listening on two lines"}
    assert n.status("3 runs") and listener.expect("STATUS") == {"STATUS": "3 runs"}
    assert n.watchdog() and listener.expect("WATCHDOG") == {"WATCHDOG": "1"}
    assert n.stopping("bye") is True
    assert n.stopping("again") is False, "STOPPING=1 goes out once"
    assert listener.expect("STOPPING") == {"STOPPING": "1", "STATUS": "bye"}
    n.close()


def test_a_missing_socket_is_logged_once_and_never_raises(short_dir, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(short_dir / "nobody.sock")})
    assert n.ready() is False and n.watchdog() is False
    assert sum("could not notify" in r.message for r in caplog.records) == 1
    n.close()
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_pid():
    sock = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier({**sock, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({**sock, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier({**sock, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier({**sock, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier({**sock, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


def test_service_status_pings_when_due_and_reports_rates(path_listener):
    listener, address = path_listener
    running = SimpleNamespace(running_ranks=lambda: [0, 1, 2])
    done = SimpleNamespace(running_ranks=lambda: [])
    collector = SimpleNamespace(runs={"a": running, "b": done}, counters=Counter(), rejects=Counter())
    status = ServiceStatus(Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}), collector, status_interval=1.0)
    status(100.0)  # pings at once, starts the rate window
    status(100.2)  # not due
    collector.counters.update(points=1_500_000, frames=500)
    collector.rejects["bad-version"] += 2
    status(100.5)  # ping due (0.5 s); status due at 101.0
    status(101.0)
    assert listener.expect("STATUS") == {"STATUS": "1 run active (3 ranks), 1.5M points/s, 500 frames/s, 2 rejected"}
    status(102.0)  # nothing new: rates drop to 0, the line changes
    assert listener.expect("STATUS")["STATUS"] == "1 run active (3 ranks), 0 points/s, 0 frames/s, 2 rejected"
    status(103.0)  # same line again: not resent
    listener.drain_queued()
    assert len([m for _, m in listener.messages if "STATUS" in m]) == 2
    assert len(listener.times("WATCHDOG")) == 5  # at 100.0, 100.5, 101.0, 102.0, 103.0: 0.5 s apart at least


def test_socket_mode_parsing():
    assert parse_socket_mode("0660") == 0o660 and parse_socket_mode("660") == 0o660 and parse_socket_mode("0o600") == 0o600
    for bad in ("0x1b6", "rw-rw----", "1777", 432):
        with pytest.raises(SystemExit):
            parse_socket_mode(bad)


def test_socket_mode_is_a_config_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bind: [ipc:///run/expman/collector.sock]\nsocket_mode: '0660'\n")
    assert load_config(str(path))["socket_mode"] == "0660"


# --- the daemon under a notify socket ----------------------------------------------------

def _start(short_dir: Path, root: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.Popen, Path, str]:
    sock = short_dir / "c.sock"
    log_path = short_dir / f"collector-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "expman.collector", "--root", str(root), "--bind", f"ipc://{sock}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env={**os.environ, **env})
    return proc, log_path, f"ipc://{sock}"


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_collector_notifies_ready_watchdog_status_and_stopping(kind, request, short_dir, root):
    listener, address = request.getfixturevalue(f"{kind}_listener")
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
    env.pop("WATCHDOG_PID", None)
    proc, log_path, endpoint = _start(short_dir, root, env, "--socket-mode", "0660")
    try:
        ready = listener.expect("READY", "1", timeout=15)
        # READY=1 means bound: the socket exists, with the mode asked for, right now.
        sock = Path(endpoint[len("ipc://"):])
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert ready["STATUS"] == f"listening on {endpoint}"
        for _ in range(3):
            listener.expect("WATCHDOG", "1", timeout=5)
        with expman.start_experiment("svc", "notify", root=root, collector=endpoint) as exp:
            for step in range(5000):
                exp.log_metric("loss", 1.0, step=step)
            listener.expect("STATUS", contains="1 run active (1 rank)", timeout=10)
        listener.expect("STATUS", contains="0 runs active", timeout=10)
        rates = [m["STATUS"].split(", ")[1] for _, m in listener.messages if "active" in m.get("STATUS", "")]
        assert any(not r.startswith("0 points/s") for r in rates), f"no status line shows the points arriving: {rates}"
        proc.send_signal(signal.SIGTERM)
        assert listener.expect("STOPPING", "1", timeout=10)["STATUS"].startswith("stopping")
        assert proc.wait(15) == 0, log_path.read_text()
    finally:
        _stop(proc)
    assert expman.open_run(exp.run_dir).metrics().num_rows == 5000


def test_local_mode_collector_does_not_notify(path_listener, short_dir, root):
    listener, address = path_listener
    ready_file = short_dir / "ready.yaml"
    proc, log_path, _ = _start(short_dir, root, {"NOTIFY_SOCKET": address},
                               "--parent-pid", str(os.getpid()), "--ready-file", str(ready_file))
    try:
        wait_for(lambda: ready_file.exists() or proc.poll() is not None, 15, "the local collector to be ready")
        assert yaml.safe_load(ready_file.read_text())["pid"] == proc.pid
        listener._drain(0.3)
        assert listener.messages == [], "a private collector is not the unit's main process"
    finally:
        assert _stop(proc) == 0, log_path.read_text()
