"""A hand-made rank: sends protocol-v1 frames over a real DEALER socket and reads the acks."""

from __future__ import annotations

import time
import uuid
from array import array
from typing import Any

import zmq

from expman._wire import columns
from expman._wire import frames as proto


class Peer:
    """One sender id on one DEALER socket; remembers every ack it got."""

    def __init__(self, endpoint: str, sender: str | None = None, run: str = "hostile1", host: str = "h") -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sender = sender or uuid.uuid4().hex
        self.run = run
        self.host = host
        self.next_seq = 0
        self.answers: dict[int, dict[str, Any]] = {}  # seq -> info ({} when plainly stored)
        self.unknown: set[str] = set()

    def send(self, kind: str, body: dict[str, Any] | None = None, *, seq: int | None | bool = True,
             **envelope: Any) -> int | None:
        """Send one frame; `seq=True` takes the next number. Returns the seq used."""
        if seq is True:
            seq = self.next_seq
            self.next_seq += 1
        fields = dict(run=self.run, host=self.host, rank=0, sender=self.sender, seq=seq, sent_at=time.time())
        fields.update(envelope)
        self.sock.send(proto.encode_frame(kind, body=body or {}, **fields))
        return seq  # type: ignore[return-value]

    def send_raw(self, frame: dict[str, Any]) -> None:
        import msgpack

        self.sock.send(msgpack.packb(frame, use_bin_type=True))

    def read(self, timeout: float = 0.2) -> None:
        while self.sock.poll(int(timeout * 1000)):
            ack = proto.decode_ack(self.sock.recv())
            for seq in ack.seqs:
                self.answers[seq] = ack.info.get(seq) or self.answers.get(seq) or {}
            self.unknown.update(ack.unknown_runs)
            timeout = 0.0

    def wait(self, seqs: list[int], timeout: float = 20.0, or_unknown: str | None = None) -> dict[int, dict[str, Any]]:
        """Read acks until every seq is answered (or the run is named unknown); fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while not all(s in self.answers for s in seqs) and not (or_unknown and or_unknown in self.unknown):
            if time.monotonic() > deadline:
                missing = [s for s in seqs if s not in self.answers]
                raise AssertionError(f"no answer for seqs {missing[:10]} within {timeout} s")
            self.read(0.2)
        return {s: self.answers[s] for s in seqs if s in self.answers}

    def hello(self, rank: int = 0, world_size: int = 1, started_at: float = 1_700_000_000.0, **extra: Any) -> int:
        body = {"experiment": "e", "name": "hostile", "world_size": world_size, "pid": 1234,
                "started_at": started_at, "heartbeat_interval": 5.0, **extra}
        return self.send(proto.HELLO, body, rank=rank)  # type: ignore[return-value]

    def close(self) -> None:
        self.sock.close(0)


def metrics_body(steps: list[int], key: str = "loss") -> dict[str, Any]:
    n = len(steps)
    return columns.metrics_body({0: key}, array("i", [0] * n).tobytes(), array("d", [1.0] * n).tobytes(),
                              array("q", steps).tobytes(), None, None)
