"""Soak: 100k malformed frames over a real socket to a real collector, then a real run.

Every malformed frame must be rejected and counted under a reason (the collector's exit
line lists the totals), none may reach a run, and the run that follows lands intact.
"""

from __future__ import annotations

import ast
import random
import re
import time
from array import array

import msgpack
import zmq
from conftest import start_collector

import expman
from expman._wire import columns
from expman._wire import frames as proto
from expman._errors import ProtocolError
from expman._wire.limits import check_envelope

TOTAL = 100_000
OVERSIZED = 3  # frames just over the 64 MiB limit (ZMQ_MAXMSGSIZE allows 1 KiB more)
TWO_PART = 500  # messages of two parts: bad-envelope
TOO_COMPLEX = 5


def valid_frame(rng: random.Random) -> bytes:
    n = rng.randint(1, 40)
    body = columns.metrics_body({0: "loss", 1: "acc"}, array("i", [rng.randint(0, 1) for _ in range(n)]).tobytes(),
                              array("d", [rng.random() for _ in range(n)]).tobytes(), list(range(n)), None,
                              [[1, "text", 4, None]])
    return proto.encode_frame("metrics", run="soak0000", host="h", rank=0, sender="soak", seq=rng.randint(0, 10**6),
                              sent_at=1.0, body=body)


def rejected_here(data: bytes) -> bool:
    """The collector's checks before a frame can touch a run (decode + envelope + body limits)."""
    try:
        check_envelope(proto.decode_frame(data))
    except ProtocolError:
        return True
    return False


def envelope(**fields) -> bytes:
    frame = {"v": 1, "kind": "metrics", "run": "soak0000", "host": "h", "rank": 0, "sender": "soak", "seq": 1, "t": 1.0,
             "body": {}}
    frame.update(fields)
    return msgpack.packb(frame, use_bin_type=True)


def malformed_frames(count: int, rng: random.Random) -> list[bytes]:
    shapes = [
        lambda: envelope(v=rng.choice([0, 2, 99, "1", None, -1])),  # wrong versions
        lambda: envelope(kind=rng.choice(["ack", "hack", "", None, 7])),
        lambda: envelope(rank=rng.choice([-1, "0", 2**40, None])),
        lambda: envelope(host=rng.choice(["a\nb", "h" * 300, 5])),
        lambda: envelope(seq=-5),
        lambda: envelope(body=[1, 2]),
        lambda: msgpack.packb(rng.choice([[1, 2], "frame", 42, None, b"\x00" * 10])),
    ]
    frames: list[bytes] = []
    while len(frames) < count:
        pick = rng.random()
        if pick < 0.3:
            data = rng.randbytes(rng.randint(0, 300))
        elif pick < 0.7:
            data = bytearray(valid_frame(rng))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randint(1, len(data))])
        else:
            data = rng.choice(shapes)()
        if rejected_here(data):  # a mutation that still decodes as a sound frame is not malformed
            frames.append(data)
    return frames


def test_soak_malformed_frames_then_a_real_run(root, short_dir):
    rng = random.Random(7)
    singles = malformed_frames(TOTAL - OVERSIZED - TWO_PART - TOO_COMPLEX, rng)
    singles += [msgpack.packb([[[]] * 100_000] * 20)] * TOO_COMPLEX
    big = b"\x00" * (proto.MAX_FRAME_BYTES + 1)
    c = start_collector(root, short_dir)
    ctx = zmq.Context.instance()
    dealers = [ctx.socket(zmq.DEALER) for _ in range(4)]
    for d in dealers:
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.SNDHWM, 100_000)
        d.connect(c.endpoint)
    try:
        t0 = time.perf_counter()
        for i, data in enumerate(singles):
            send(dealers[i % 4], [data])
        for i in range(TWO_PART):
            send(dealers[i % 4], [b"part one", b"part two"])
        for _ in range(OVERSIZED):
            send(dealers[0], [big])
        sent_s = time.perf_counter() - t0
        for i, d in enumerate(dealers):  # a barrier: a frame of an unknown run is answered, in order
            send(d, [proto.encode_frame(proto.LOG, run="barrier0", host="h", rank=0, sender=f"barrier{i}", seq=0,
                                        sent_at=1.0, body={"lines": []})])
        for d in dealers:  # refusals of frames that carried a seq are answered first
            while True:
                assert d.poll(30_000), "the collector did not get through the malformed frames in 30 s"
                ack = proto.decode_ack(d.recv())
                if ack.unknown_runs:
                    assert ack.unknown_runs == ["barrier0"]
                    break
                assert all("rejected" in ack.info[seq] for seq in ack.seqs), ack
        handled_s = time.perf_counter() - t0
        # Now a real run; it must land intact behind (or among) all that.
        exp = expman.start_experiment("soak", name="real", root=root, collector=c.endpoint)
        for step in range(5000):
            exp.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 5000}, step=step)
        exp.log_parameters({"lr": 0.1})
        exp.log_message("after the storm")
        assert exp.finish(timeout=60)
        done_s = time.perf_counter() - t0
    finally:
        for d in dealers:
            d.close(0)
        assert c.stop() == 0, c.log()[-3000:]
    totals = re.search(r"collector stopped: (\{.*\}); rejected: (\{.*\})", c.log())
    assert totals, c.log()[-3000:]
    counters, rejects = ast.literal_eval(totals.group(1)), ast.literal_eval(totals.group(2))
    print(f"\nsoak: {TOTAL} malformed frames sent in {sent_s:.2f} s, all rejected after {handled_s:.2f} s "
          f"({TOTAL / handled_s:,.0f} frames/s), the real run confirmed after {done_s:.2f} s; "
          f"rejects {rejects}; counters {counters}")
    assert sum(rejects.values()) == TOTAL, rejects
    assert rejects["bad-envelope"] == TWO_PART and rejects["oversized"] == OVERSIZED
    assert rejects["too-complex"] == TOO_COMPLEX
    assert {"not-msgpack", "bad-shape", "bad-version", "bad-kind", "bad-values"} <= set(rejects)
    [run_dir] = [p.parent for p in root.glob("*/*/run.yaml")]  # nothing else reached a run
    run = expman.open_run(run_dir)
    assert run.info["status"] == "finished"
    table = run.metrics()
    assert table.num_rows == 10_000
    assert sorted(table.column("step").to_pylist()) == sorted(list(range(5000)) * 2)
    assert run.params == {"lr": 0.1}
    assert "after the storm" in (run_dir / "run.log").read_text()


def send(sock: zmq.Socket, parts: list[bytes]) -> None:
    while True:
        try:
            sock.send_multipart(parts, zmq.NOBLOCK, copy=len(parts[0]) < 1 << 20)
            return
        except zmq.Again:
            sock.poll(100, zmq.POLLOUT)
