"""Who may write (CURVE on tcp, socket permissions on ipc) and what a frame may contain."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from _helpers import wait_for
from conftest import start_collector

import expman
from expman._wire import curve_keys as _curve
from expman._wire import frames as proto
from expman._errors import ProtocolError
from expman._wire.limits import check_envelope

RANK = """
import expman, sys
exp = expman.start_experiment("sec", name=sys.argv[1] if len(sys.argv) > 1 else "{name}", root={root!r}, collector={endpoint!r})
for i in range(100):
    exp.log_metric("loss", float(i), step=i)
exp.log_message("hello from {name}")
print("confirmed" if exp.finish(timeout={timeout}) else "unconfirmed")
"""


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    result = subprocess.run([sys.executable, "-m", "expman", "keys", "curve-init", "--dir", str(folder)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return folder


def curve_env(keys: Path, client: str = "client") -> dict[str, str]:
    return {"EXPMAN_CURVE_SERVER_KEY": str(keys / "collector.public"),
            "EXPMAN_CURVE_CLIENT_KEY": str(keys / f"{client}.secret")}


def runs_in(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/run.yaml"))


def test_curve_init_writes_private_secrets_and_keeps_existing_keys(keys):
    for name in ("collector", "client"):
        assert stat.S_IMODE((keys / f"{name}.secret").stat().st_mode) == 0o600
        assert len(_curve.read_key(keys / f"{name}.public")) == 40
    assert (keys / "allowed" / "client.public").read_text() == (keys / "client.public").read_text()
    before = (keys / "collector.secret").read_bytes()
    _curve.init_dir(keys, "node7")
    assert (keys / "collector.secret").read_bytes() == before  # never overwritten
    assert (keys / "allowed" / "node7.public").exists()


def test_curve_collector_accepts_only_allowed_clients(root, short_dir, keys, tmp_path, run_script):
    c = start_collector(root, short_dir, "tcp://127.0.0.1:0", "--bind", f"ipc://{short_dir}/plain.sock",
                        "--curve-secret", str(keys / "collector.secret"))
    try:
        # An unknown key: a pair of its own, not in allowed/.
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        _curve.create_pair(stranger, "client")
        denied = run_script(RANK.format(name="stranger", root=str(root), endpoint=c.endpoint, timeout=1.5),
                            env={**curve_env(keys), "EXPMAN_CURVE_CLIENT_KEY": str(stranger / "client.secret")})
        assert "unconfirmed" in denied.stdout, denied.stderr
        # A plain client (no CURVE) on the same tcp endpoint: the handshake fails, nothing is read.
        ctx = zmq.Context.instance()
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(c.endpoint)
        hello = proto.encode_frame(proto.HELLO, run="feedf00d", host="h", rank=0, sender="x" * 32, seq=0, sent_at=1.0,
                                   body={"experiment": "sec", "name": "plain", "world_size": 1})
        try:
            plain.send(hello, zmq.NOBLOCK)  # queued unless the failed handshake already took the pipe away
        except zmq.Again:
            pass  # a DEALER with no pipe would block here for good
        assert plain.poll(1000) == 0  # no ack
        plain.close(0)
        assert runs_in(root) == []
        assert "auth-denied" in c.log()
        # An allowed key lands its run.
        ok = run_script(RANK.format(name="friend", root=str(root), endpoint=c.endpoint, timeout=20), env=curve_env(keys))
        assert "confirmed" in ok.stdout and "unconfirmed" not in ok.stdout, ok.stderr
        # ipc endpoints of the same collector stay as they were: plain, guarded by file permissions.
        ipc = next(e for e in yaml_endpoints(c) if e.startswith("ipc://"))
        plain_ipc = run_script(RANK.format(name="local", root=str(root), endpoint=ipc, timeout=20))
        assert "confirmed" in plain_ipc.stdout and "unconfirmed" not in plain_ipc.stdout, plain_ipc.stderr
    finally:
        assert c.stop() == 0, c.log()
    names = sorted(expman.open_run(p).info["name"] for p in runs_in(root))
    assert names == ["friend", "local"]
    run = expman.open_run(next(p for p in runs_in(root) if p.name.startswith("friend")))
    assert run.metrics().num_rows == 100
    assert "auth-denied" in c.log().rsplit("collector stopped", 1)[1]  # counted in the exit totals


def yaml_endpoints(c) -> list[str]:
    import yaml

    ready = sorted(c.log_path.parent.glob("ready-*.yaml"))[-1]
    return yaml.safe_load(ready.read_text())["endpoints"]


def test_relay_talks_curve_to_its_head(tmp_path, short_dir, keys, run_script):
    head_root = tmp_path / "head"
    head_root.mkdir()
    head = start_collector(head_root, short_dir, "tcp://127.0.0.1:0", "--curve-secret", str(keys / "collector.secret"))
    relay_dir = short_dir / "r"
    relay_dir.mkdir()
    relay = start_collector(tmp_path / "unused", relay_dir, None, "--forward", head.endpoint,
                            "--forward-server-key", str(keys / "collector.public"),
                            "--forward-client-key", str(keys / "client.secret"))
    try:
        ok = run_script(RANK.format(name="relayed", root=str(head_root), endpoint=relay.endpoint, timeout=20))
        assert "confirmed" in ok.stdout and "unconfirmed" not in ok.stdout, ok.stderr + relay.log() + head.log()
    finally:
        assert relay.stop() == 0, relay.log()
        assert head.stop() == 0, head.log()
    [run_dir] = runs_in(head_root)
    assert expman.open_run(run_dir).metrics().num_rows == 100


def test_clear_errors_for_missing_and_bad_keys(tmp_path, root, keys):
    def collector(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "expman.collector", "--root", str(root), "--bind", "tcp://127.0.0.1:0",
                               *args], capture_output=True, text=True, timeout=20)

    missing = collector("--curve-secret", str(tmp_path / "nope.secret"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "curve-init" in missing.stderr
    loose = tmp_path / "loose.secret"
    loose.write_bytes((keys / "collector.secret").read_bytes())
    loose.chmod(0o644)
    assert "readable by others" in collector("--curve-secret", str(loose)).stderr
    garbage = tmp_path / "garbage.secret"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    assert "not a CURVE key" in collector("--curve-secret", str(garbage)).stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no *.public key" in collector("--curve-secret", str(keys / "collector.secret"), "--curve-allow", str(empty)).stderr
    # Rank side: the error comes at start_experiment, not later in the training loop.
    with pytest.raises(_curve.CurveKeyError, match="not a CURVE key"):
        _curve.client_keys(env={"EXPMAN_CURVE_SERVER_KEY": str(garbage), "EXPMAN_CURVE_CLIENT_KEY": str(keys / "client.secret")})
    with pytest.raises(_curve.CurveKeyError, match="does not exist"):
        _curve.client_keys(env={"EXPMAN_CURVE_SERVER_KEY": str(keys / "collector.public"),
                                "EXPMAN_CURVE_CLIENT_KEY": str(tmp_path / "missing.secret")})
    assert _curve.client_keys(env={}) is None  # nothing configured: plain
    keys_from_text = _curve.client_keys((keys / "collector.public").read_text().strip(), keys / "client.secret", env={})
    assert keys_from_text.server_public == _curve.read_key(keys / "collector.public")


def test_local_mode_socket_is_private(tmp_path):
    from expman._rank import start as _api

    exp = expman.start_experiment("sec", name="local", root=tmp_path / "runs")
    try:
        [local] = _api._local_collectors.values()
        path = Path(local.endpoint[len("ipc://"):])
        wait_for(lambda: path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600, 15, "the socket with mode 0600")
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.parent.parent.stat().st_uid == os.getuid()
        exp.log_metric("x", 1.0)
    finally:
        assert exp.finish(timeout=20)


# --- validation ---------------------------------------------------------------------------


def frame(kind: str = proto.LOG, body: dict | None = None, **envelope) -> proto.Frame:
    fields = dict(run="abcd1234", host="node1", rank=0, sender="s" * 32, seq=1, sent_at=1.0)
    fields.update(envelope)
    return proto.decode_frame(proto.encode_frame(kind, body=body or {}, **fields))


@pytest.mark.parametrize("envelope", [
    {"host": "a\nb"}, {"host": "h" * 300}, {"run": "r" * 200}, {"sender": "s\x00"}, {"rank": 2**40},
])
def test_envelope_limits(envelope):
    with pytest.raises(ProtocolError) as err:
        check_envelope(frame(proto.HEARTBEAT, **envelope))
    assert err.value.reason == "bad-values"


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("kind,body", [
    (proto.HELLO, {"experiment": "e", "name": "n", "tags": ["t"] * 1000}),
    (proto.HELLO, {"experiment": "e", "name": "n", "tags": ["x" * 1000]}),
    (proto.HELLO, {"experiment": "e", "name": "n" * 5000}),
    (proto.METRICS, {"keys": {0: "k" * 2000}}),
    (proto.METRICS, {"keys": {0: "k"}, "texts": [[0, "t" * (2 * 1024 * 1024), None, None]]}),
    (proto.LOG, {"lines": [[1.0, "info\n2026 [forged] INFO", "x"]]}),
    (proto.LOG, {"lines": [[1.0, "info", "x" * (2 * 1024 * 1024)]]}),
    (proto.LOG, {"lines": [["yesterday", "info", "x"]]}),
    (proto.HELLO, {"experiment": "e", "name": "n", "parent": "../../etc"}),
    (proto.PARAMS, {"params": {"k" * 2000: 1}}),
    (proto.PARAMS, {"params": {1: 1}}),
    (proto.PARAMS, {"params": {"a": nested(40)}}),
    (proto.PARAMS, {"params": {"a": list(range(200_000))}}),
])
def test_body_limits(kind, body):
    with pytest.raises(ProtocolError) as err:
        check_envelope(frame(kind, body))
    assert err.value.reason in ("bad-values", "bad-shape")


def test_ordinary_frames_pass():
    check_envelope(frame(proto.HELLO, {"experiment": "e", "name": "n", "tags": ["a", "b"], "parent": None}))
    check_envelope(frame(proto.LOG, {"lines": [[1.0, "info", "two\nlines\twith tab \x1b[1mbold"]]}))
    check_envelope(frame(proto.PARAMS, {"params": {"lr": 0.1, "model": {"layers": [1, 2, 3]}}}))
    check_envelope(frame(proto.METRICS, {"keys": {0: "train/loss ✓"}, "ids": b"", "values": b"", "steps": b"",
                                         "texts": [[0, "ok", 1, None]]}))
    check_envelope(frame(proto.FINISH, {"status": "failed", "ended_at": 2.0, "last_step": 3, "dropped_points": 0,
                                        "error": {"type": "ValueError", "message": "boom", "traceback": "..."}}))
    check_envelope(frame(proto.HEARTBEAT, {"pid": 123, "last_step": None}, seq=None))


any_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=30) | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(proto.RANK_KINDS)),
       st.dictionaries(st.sampled_from(["tags", "experiment", "name", "dir", "parent", "keys", "texts", "lines", "params"]),
                       any_value))
def test_limits_raise_only_protocol_errors(kind, body):
    try:
        check_envelope(frame(kind, body))
    except ProtocolError:
        pass


def test_version_must_be_the_integer_one():
    for version in (True, 1.0):
        data = msgpack.packb({"v": version, "kind": "heartbeat", "run": "r", "host": "h", "rank": 0, "sender": "s",
                              "seq": None, "t": 1.0, "body": {}})
        with pytest.raises(ProtocolError, match="bad-version"):
            proto.decode_frame(data)


def test_decoding_is_bounded():
    """A small frame that would expand into millions of Python objects is refused early."""
    nested = msgpack.packb([[[]] * 100_000] * 20)  # 2 MB of empty arrays
    with pytest.raises(ProtocolError) as err:
        proto.decode_frame(nested)
    assert err.value.reason == "too-complex"
    with pytest.raises(ProtocolError) as err:
        proto.decode_frame(msgpack.packb([None] * 2_000_000))
    assert err.value.reason == "not-msgpack"  # one array over the length limit
    with pytest.raises(ProtocolError) as err:
        proto.decode_frame(b"\xa3\xff\xfe\xfd")  # a str that is not UTF-8
    assert err.value.reason == "not-msgpack"
