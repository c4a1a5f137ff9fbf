"""The rank's end of the connection to a collector: one socket setup, one way to send and read.

The sender loop (expman/_rank/sender.py) and `expman sync` (expman/_rank/sync.py) both
talk to a collector through these; what to send and when is the Outbox's rule
(expman/_wire/delivery.py).
"""

from __future__ import annotations

import logging
from typing import Iterator

import zmq

from expman._wire import frames as proto
from expman._wire.curve_keys import ClientKeys
from expman._wire.delivery import Entry, Outbox

log = logging.getLogger("expman")

# Below this, copying a frame into ZeroMQ (a memcpy, ~50 µs a MiB) is cheaper than pinning it:
# a zero-copy send is released later by pyzmq's own thread, which takes the GIL to do it.
_ZERO_COPY_MIN = 1 << 20


def connect(ctx: zmq.Context, endpoint: str, curve: ClientKeys | None = None) -> zmq.Socket:
    """A DEALER connected to `endpoint` that never blocks and never queues into the void."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IMMEDIATE, 1)  # no connection: send fails and we keep the frame
    dealer.setsockopt(zmq.RECONNECT_IVL, 20)
    dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)  # a restarted collector is found within 1 s; each try wakes ZeroMQ's thread
    dealer.setsockopt(zmq.SNDHWM, 1000)
    if curve is not None:
        curve.apply(dealer, endpoint)  # tcp only
    dealer.connect(endpoint)
    return dealer


def send_due(dealer: zmq.Socket, outbox: Outbox, now: float) -> list[Entry]:
    """Send what the outbox says is due, until the socket would block; return what went out."""
    sent = []
    for entry in outbox.due():
        data = entry.data
        try:
            dealer.send(data, zmq.NOBLOCK, copy=len(data) < _ZERO_COPY_MIN)  # type: ignore[arg-type]
        except zmq.Again:
            break  # no connection or queue full: try again next tick
        outbox.sent(entry, now)
        sent.append(entry)
    return sent


def read_acks(dealer: zmq.Socket) -> Iterator[proto.Ack]:
    """Every ack waiting on the socket; a reply that is not one is logged and skipped."""
    while True:
        try:
            data = dealer.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            yield proto.decode_ack(data)
        except Exception as exc:  # noqa: BLE001 - a bad reply costs that reply
            log.warning("expman: ignoring a reply from the collector that is not an ack: %s", exc)
