"""Relay mode (`expman-collector --forward tcp://HEAD:PORT`): this host's frames go to a
head collector that writes the run, for clusters without a shared filesystem.

The relay persists nothing and acknowledges nothing itself. It keeps one DEALER to the
head per sending rank process, so the head sees each sender exactly as if it were
connected directly (its sequence numbers, its dedup window), and it passes the head's
acks back to that rank unchanged. A rank therefore keeps every frame until the head has
persisted it, and a relay or head restart costs only resends: the no-loss guarantees
are the head's.
"""

from __future__ import annotations

import logging
import time

import zmq

from expman._wire.curve_keys import ClientKeys

log = logging.getLogger("expman.collector")

IDLE_SENDER_S = 600.0


class Relay:
    def __init__(self, ctx: zmq.Context, head: str, poller: zmq.Poller, keys: ClientKeys | None = None) -> None:
        self.head = head
        self._keys = keys  # CURVE client keys for a tcp head (--forward-server-key)
        self._ctx = ctx
        self._poller = poller
        self._upstream: dict[str, zmq.Socket] = {}  # sender id -> DEALER to the head
        self._route: dict[zmq.Socket, bytes] = {}  # DEALER -> the rank's ROUTER identity
        self._used: dict[str, float] = {}

    def forward(self, sender: str, identity: bytes, data: bytes) -> bool:
        """Pass one frame up; False if the head's queue is full (the rank will resend)."""
        sock = self._upstream.get(sender)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)  # frames queue here while the connection comes up
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if self._keys is not None:
                self._keys.apply(sock, self.head)
            sock.connect(self.head)
            self._upstream[sender] = sock
            self._poller.register(sock, zmq.POLLIN)
        self._route[sock] = identity  # a restarted rank keeps its sender id only if it is the same process
        self._used[sender] = time.monotonic()
        try:
            sock.send(data, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def sockets(self) -> list[zmq.Socket]:
        return list(self._route)

    def pass_back(self, sock: zmq.Socket, router: zmq.Socket) -> int:
        """Hand every reply waiting on `sock` to its rank; return how many."""
        count = 0
        while True:
            try:
                reply = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return count
            try:
                router.send_multipart([self._route[sock], reply], zmq.NOBLOCK)
                count += 1
            except zmq.Again:
                pass  # the rank resends; the head acks the duplicate again

    def forget_idle(self, now: float) -> None:
        for sender, used in list(self._used.items()):
            if now - used > IDLE_SENDER_S:
                sock = self._upstream.pop(sender)
                self._poller.unregister(sock)
                self._route.pop(sock, None)
                del self._used[sender]
                sock.close(0)

    def close(self) -> None:
        for sock in self._upstream.values():
            sock.close(0)
        self._upstream.clear()
        self._route.clear()
