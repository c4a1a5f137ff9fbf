"""A CURVE collector tells its admin about the peers it refuses; a rank gets a hint naming the
variables to check. Real collector processes, real ranks and sockets on loopback."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import zmq
from _helpers import wait_for
from conftest import start_collector

from expman._wire.curve_keys import CLIENT_KEY_ENV, SERVER_KEY_ENV, curve_refusal_hint
from expman.collector._auth import RefusalLog
from expman.collector._sdnotify import Notifier, ServiceStatus

RANK = """
import expman
exp = expman.start_experiment("sec", "keyless", root={root!r}, collector={endpoint!r})
exp.log_metric("loss", 1.0, step=0)
print("confirmed" if exp.finish(timeout=1.5) else "unconfirmed")
"""


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    done = subprocess.run([sys.executable, "-m", "expman", "keys", "curve-init", "--dir", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return folder


def refusal_lines(log: str, reason: str) -> list[str]:
    return [line for line in log.splitlines() if f"refused a connection ({reason})" in line]


def test_collector_logs_and_counts_clients_that_fail_the_curve_handshake(root, short_dir, keys, run_script):
    c = start_collector(root, short_dir, "tcp://127.0.0.1:0", "--curve-secret", str(keys / "collector.secret"))
    try:
        # A rank with no CURVE keys at all: libzmq refuses it before ZAP is ever asked.
        env = {SERVER_KEY_ENV: "", CLIENT_KEY_ENV: ""}
        keyless = run_script(RANK.format(root=str(root), endpoint=c.endpoint), env=env)
        assert "unconfirmed" in keyless.stdout, keyless.stderr
        assert "nothing was ever acknowledged" in keyless.stderr and SERVER_KEY_ENV in keyless.stderr, keyless.stderr
        # libzmq reports it as a mechanism mismatch, or as the client hanging up mid-handshake
        # (which one depends on who notices first): either way one line naming the variables.
        lines = wait_for(lambda: refusal_lines(c.log(), "auth-no-curve") or refusal_lines(c.log(), "auth-dropped"),
                         60, "the refusal in the collector's log")
        assert len(lines) == 1, c.log()
        assert "EXPMAN_CURVE_SERVER_KEY" in lines[0] and "EXPMAN_CURVE_CLIENT_KEY" in lines[0], lines[0]
        assert c.endpoint in lines[0]
        # A CURVE client holding the wrong server key retries its handshake again and again:
        # counted every time, logged once (the next line waits a minute).
        ctx = zmq.Context.instance()
        wrong = ctx.socket(zmq.DEALER)
        wrong.setsockopt(zmq.LINGER, 0)
        wrong.curve_serverkey, _ = zmq.curve_keypair()
        wrong.curve_publickey, wrong.curve_secretkey = zmq.curve_keypair()
        wrong.connect(c.endpoint)
        wrong.send(b"hello?")
        try:
            wait_for(lambda: refusal_lines(c.log(), "auth-wrong-server-key"), 60, "the wrong-key refusal")
            assert wrong.poll(200) == 0  # no answer, ever
        finally:
            wrong.close(0)
        assert len(refusal_lines(c.log(), "auth-wrong-server-key")) == 1
    finally:
        assert c.stop() == 0, c.log()
    totals = c.log().rsplit("collector stopped", 1)[1]
    assert ("'auth-no-curve'" in totals or "'auth-dropped'" in totals) and "'auth-wrong-server-key'" in totals
    assert list(root.glob("*/*/run.yaml")) == []


def test_refusal_log_holds_back_repeats_for_a_minute():
    log = RefusalLog(interval=60.0)
    assert log.line("auth-no-curve", "x", now=0.0) == "refused a connection (auth-no-curve): x"
    assert [log.line("auth-no-curve", "x", now=t) for t in (0.1, 1.0, 59.0)] == [None, None, None]
    assert log.line("auth-denied", "y", now=1.0) is not None  # each reason on its own clock
    assert log.line("auth-no-curve", "x", now=61.0) == (
        "refused a connection (auth-no-curve): x (3 more like it in the last 61 s)")
    assert log.line("auth-no-curve", "x", now=200.0) == "refused a connection (auth-no-curve): x"


def test_status_line_counts_refused_handshakes_apart_from_rejected_frames():
    class Collector:
        runs: dict = {}
        counters = Counter()
        rejects = Counter({"bad-frame": 2, "auth-no-curve": 40, "auth-denied": 3})

    line = ServiceStatus(Notifier({}), Collector()).line()
    assert line.endswith("2 rejected, 43 handshakes refused")


def test_curve_refusal_hint_names_the_variables_to_set_or_check(tmp_path):
    assert curve_refusal_hint("ipc:///tmp/x.sock", env={}) is None  # ipc never uses CURVE
    unset = curve_refusal_hint("tcp://head:5555", env={})
    assert unset is not None and "\n" not in unset
    assert "tcp://head:5555" in unset and SERVER_KEY_ENV in unset and CLIENT_KEY_ENV in unset
    assert "expman keys curve-init" in unset
    given = curve_refusal_hint("tcp://head:5555", env={SERVER_KEY_ENV: "/keys/collector.public",
                                                       CLIENT_KEY_ENV: "/keys/node7.secret"})
    assert given is not None and "\n" not in given
    assert re.search(r"EXPMAN_CURVE_SERVER_KEY \(/keys/collector\.public\)", given)
    assert "/keys/node7.secret" in given and "allowed/" in given
