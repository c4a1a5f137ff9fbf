"""The collector's frame decoding never fails on hostile bytes except with ProtocolError."""

from __future__ import annotations

from array import array

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from expman._wire import columns
from expman._wire import frames as proto
from expman._storage.rows import frame_table
from expman._errors import ProtocolError


def valid_metrics_frame() -> bytes:
    body = columns.metrics_body({0: "loss", 1: "acc"}, array("i", [0, 1, 0]).tobytes(), array("d", [1.0, 0.5, 2.0]).tobytes(),
                              [1, None, 3], [None, 2.0, None], [[1, "text", 4, None]])
    return proto.encode_frame("metrics", run="r1", host="h", rank=0, sender="s", seq=7, sent_at=1.0, body=body)


def decode_all_the_way(data: bytes) -> None:
    """What the collector does with a metrics frame: envelope, body, rows."""
    try:
        frame = proto.decode_frame(data)
        if frame.kind == proto.METRICS:
            frame_table(frame)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes(data):
    decode_all_the_way(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_frames(data):
    frame = bytearray(valid_metrics_frame())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    decode_all_the_way(bytes(frame[:cut]))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["keys", "ids", "values", "steps", "times", "texts"]), msgpack_values))
def test_well_formed_envelopes_with_arbitrary_bodies(body):
    data = msgpack.packb({"v": 1, "kind": "metrics", "run": "r", "host": "h", "rank": 0, "sender": "s",
                          "seq": 1, "t": 0.0, "body": body}, use_bin_type=True)
    decode_all_the_way(data)


# --- a live collector against well-formed frames with hostile field values ------------------

def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


HOSTILE = [float("inf"), float("-inf"), float("nan"), 1e300, -1e300, 1e12, 1.7e15, -1.0, 0, -1, 2**31, 2**63 - 1,
           2**63, 2**64 - 1, -(2**63), True, None, "", "x" * 300, "y" * 5000, "a\nb", "..", "a/b", "\x00",
           b"\x00\xff", [], {}, _deep(40), _deep(300), {"k": _deep(60)}, ["t"] * 300, [1.0, "info"],
           [[float("inf"), "info", "x"]], [[1.0, _deep(50), "x"]], {1: "x"}, {"a": b"bin"}, "z" * (2 << 20)]
FIELDS = {
    proto.HELLO: {"experiment": ["e", "ok"], "name": ["fuzz"], "dir": [None, "fuzz-d"], "world_size": [4],
                  "pid": [99], "started_at": [1.7e9], "tags": [["t"]], "parent": [None], "reopen": [False],
                  "software": [{"python": "3"}], "heartbeat_interval": [5.0], "local_rank": [0],
                  "log_hardware": [False], "hardware_interval": [None], "launcher": ["none"], "job": [None]},
    proto.HEARTBEAT: {"pid": [99], "last_step": [3]},
    proto.METRICS: {"keys": [{0: "loss"}], "ids": [b"\x00" * 4], "values": [b"\x00" * 8], "steps": [b"\x01" + b"\x00" * 7],
                    "times": [None, [1.7e9]], "texts": [None, [[0, "txt", 1, None]]]},
    proto.PARAMS: {"params": [{"lr": 0.1}]},
    proto.LOG: {"lines": [[[1.7e9, "info", "fuzz line"]]]},
    proto.FINISH: {"status": ["finished"], "ended_at": [1.7e9 + 5], "last_step": [3], "dropped_points": [0],
                   "error": [None]},
    proto.ARTIFACT: {"i": [0], "data": [b"abc"], "last": [False], "name": ["f.txt"], "size": [3], "chunk": [1024],
                     "encrypt": [False], "time": [1.7e9], "sha256": [None]},
    proto.CODE: {"code": [{"source": "script", "files": 1}]},
}


@st.composite
def hostile_frames(draw):
    """A frame of any kind whose fields are mostly sound, a few of them hostile."""
    kind = draw(st.sampled_from(sorted(FIELDS)))
    body = {}
    for name, good in FIELDS[kind].items():
        if draw(st.integers(0, 4)) == 0:
            if draw(st.booleans()):
                body[name] = draw(st.sampled_from(HOSTILE))
        else:
            body[name] = draw(st.sampled_from(good))
    envelope = {}
    for name, good in {"rank": [0, 1], "sent_at": [1.7e9], "low": [0], "host": ["h"],
                       "run": ["fuzz0001", "fuzz0001", "fuzz0002"]}.items():
        hostile = draw(st.integers(0, 24)) == 0
        value = draw(st.sampled_from(HOSTILE if hostile else good))
        envelope[name] = value
    return kind, body, envelope


def test_a_live_collector_survives_hostile_field_values(tmp_path, short_dir):
    """Hypothesis sends well-formed frames of every kind with hostile field values to a real
    collector: it stays up, answers every frame with a seq, and writes only inside run folders."""
    from _peer import Peer
    from conftest import start_collector

    import expman

    root = tmp_path / "runs"
    root.mkdir()
    c = start_collector(root, short_dir)
    peer = Peer(c.endpoint, run="fuzz0001")
    try:
        peer.wait([peer.hello(world_size=2)])
        seqs = iter(range(1, 10**6))

        @settings(max_examples=150, deadline=None, derandomize=True)
        @given(hostile_frames())
        def send_one(frame):
            kind, body, envelope = frame
            seq = next(seqs)
            if kind == proto.ARTIFACT:
                body = {**body, "id": seq}  # one frame per transfer: none waits for a missing chunk
            fields = dict(v=1, kind=kind, seq=seq, sender=peer.sender, body=body, **envelope)
            fields["t"] = fields.pop("sent_at")
            peer.send_raw(fields)
            run = envelope["run"] if isinstance(envelope["run"], str) else None
            peer.wait([seq], timeout=30, or_unknown=run)
            peer.unknown.clear()
            assert c.proc.poll() is None, c.log()[-3000:]

        send_one()
        assert c.proc.poll() is None
    finally:
        peer.close()
        rc = c.stop()
    assert rc == 0, c.log()[-3000:]
    log = c.log()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
    # Nothing outside run folders: every file under the root is inside <experiment>/<run folder>/
    # with its run.yaml, and the root's parent holds nothing new.
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if path.is_file():
            assert len(parts) >= 3 and (root / parts[0] / parts[1] / "run.yaml").exists(), path
    assert {p.name for p in tmp_path.iterdir()} <= {"runs", "spool"}
    assert {p.name.split("-")[0] for p in short_dir.iterdir()} <= {"c.sock", "ready", "collector"}
    # And every run it wrote reads back.
    for run_yaml in root.glob("*/*/run.yaml"):
        run = expman.open_run(run_yaml.parent)
        assert run.info["status"] in ("running", "finished", "failed", "killed", "crashed")
        run.metrics()
        run.rank_stats()
    totals = log.splitlines()[-1]
    assert "'points'" in totals and "bad-values" in totals, totals  # some frames stored, some refused
