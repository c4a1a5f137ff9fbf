"""CURVE authentication for the collector's tcp endpoints: a ZAP handler (RFC 27).

libzmq asks `inproc://zeromq.zap.01` about every CURVE handshake on a socket with a
ZAP domain; this answers from the allowed public keys. There is no thread: the handler's
socket sits in the collector's own poller, and a handshake waits (at most one turn) for
its answer. Denials are counted with the frame rejects (`auth-denied`), so a stranger's
attempts show up in the collector's totals; a denied peer never gets to send a frame.
"""

from __future__ import annotations

import logging
from typing import Callable

import zmq
from zmq.utils import z85

log = logging.getLogger("expman.collector")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "expman"


class CurvePolicy:
    """Which peers may connect: plain rules, no sockets."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed  # z85 public keys

    def check(self, mechanism: bytes, credentials: list[bytes]) -> tuple[bool, str]:
        if mechanism != b"CURVE":
            return False, f"mechanism {mechanism.decode(errors='replace')} is not CURVE"
        if len(credentials) != 1 or len(credentials[0]) != 32:
            return False, "no CURVE public key"
        key = z85.encode(credentials[0])
        if key not in self.allowed:
            return False, f"public key {key.decode()} is not in the allowed list"
        return True, "OK"


class ZapHandler:
    """Answers ZAP requests; bind it before any endpoint that uses CURVE."""

    def __init__(self, ctx: zmq.Context, policy: CurvePolicy, on_deny: Callable[[str, str], None]) -> None:
        self.policy = policy
        self._on_deny = on_deny
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    def handle(self) -> int:
        """Answer every waiting request; return how many."""
        count = 0
        while True:
            try:
                msg = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return count
            count += 1
            if len(msg) < 6 or msg[0] != b"1.0":
                # Malformed request (only libzmq talks here): answer so the socket stays usable.
                self.socket.send_multipart([b"1.0", msg[1] if len(msg) > 1 else b"", b"500", b"bad ZAP request", b"", b""])
                continue
            _version, request_id, _domain, address, _identity, mechanism, *credentials = msg
            try:
                allowed, reason = self.policy.check(mechanism, credentials)
            except Exception as exc:  # never let one handshake stop the collector: deny it
                allowed, reason = False, f"could not check the key: {exc!r}"
            if allowed:
                user = z85.encode(credentials[0])
                self.socket.send_multipart([b"1.0", request_id, b"200", b"OK", user, b""])
            else:
                self._on_deny("auth-denied", f"{address.decode(errors='replace')}: {reason}")
                self.socket.send_multipart([b"1.0", request_id, b"400", reason.encode(), b"", b""])

    def close(self) -> None:
        self.socket.close(0)


class CurveServer:
    """The collector's key pair and the public keys of the clients it accepts."""

    def __init__(self, secret: bytes, allowed: frozenset[bytes]) -> None:
        self.secret = secret
        self.public = zmq.curve_public(secret)
        self.allowed = allowed

    @classmethod
    def from_files(cls, secret_file: str, allow_dir: str | None = None) -> CurveServer:
        """`allow_dir` defaults to allowed/ beside the secret key (the curve-init layout)."""
        from pathlib import Path

        from expman._wire.curve_keys import ALLOWED_DIR, read_allowed, read_key

        if not zmq.has("curve"):
            raise ValueError("this libzmq was built without CURVE support")
        secret = read_key(secret_file, secret=True)
        folder = allow_dir or Path(secret_file).expanduser().parent / ALLOWED_DIR
        return cls(secret, read_allowed(folder))
