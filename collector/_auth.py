"""CURVE authentication for the collector's tcp endpoints: a ZAP handler (RFC 27), and
what it tells the admin about the peers it refuses.

libzmq asks `inproc://zeromq.zap.01` about every CURVE handshake on a socket with a
ZAP domain; this answers from the allowed public keys. There is no thread: the handler's
sockets sit in the collector's own poller, and a handshake waits (at most one turn) for
its answer. A client that fails before ZAP is asked (no CURVE keys at all, or the wrong
server key) never reaches it, so the handler also watches the ROUTER's handshake
failures on a socket monitor. Every refusal is counted in the collector's rejects
(`auth-denied`, `auth-no-curve`, `auth-wrong-server-key`, `auth-dropped`, `auth-handshake`), so it shows
in the status line and the exit totals, and logged at most once a minute per reason
(clients retry a refused handshake several times a second); a refused peer never gets
to send a frame.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Callable

import zmq
from zmq.utils import z85

log = logging.getLogger("expman.collector")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "expman"
REFUSAL_LOG_INTERVAL_S = 60.0


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


class RefusalLog:
    """Rate-limited log lines for refused handshakes: plain rules, no sockets.

    The first refusal of each reason is logged at once; later ones at most once per
    `interval` seconds, saying how many were held back in between."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._logged_at: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def line(self, reason: str, detail: str, now: float) -> str | None:
        """The line to log for this refusal now, or None to hold it back (counted)."""
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.interval:
            self._held[reason] += 1
            return None
        held = self._held.pop(reason, 0)
        self._logged_at[reason] = now
        since = f" ({held} more like it in the last {now - last:.0f} s)" if held and last is not None else ""
        return f"refused a connection ({reason}): {detail}{since}"


_NO_KEYS = ("give its ranks EXPMAN_CURVE_SERVER_KEY (this collector's .public) and EXPMAN_CURVE_CLIENT_KEY "
            "(an allowed client's .secret)")
_FAILURES = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: (
        "auth-no-curve", "a client without CURVE keys tried {endpoint}; " + _NO_KEYS),
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: (
        "auth-wrong-server-key", "a CURVE client that does not know this collector's public key tried {endpoint}; "
                                 "its EXPMAN_CURVE_SERVER_KEY must be this collector's .public"),
}


class ZapHandler:
    """Answers ZAP requests and notes refused handshakes; bind it before any endpoint that
    uses CURVE. `counts` is where refusals are counted (the collector's rejects); with
    `monitor`, the socket whose handshake failures to watch (the collector's ROUTER)."""

    def __init__(self, ctx: zmq.Context, policy: CurvePolicy, counts: Counter[str],
                 monitor: zmq.Socket | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.counts = counts
        self.refusals = RefusalLog()
        self._clock = clock
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.monitor = None
        if monitor is not None:
            self.monitor = monitor.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._protocol_failed_at: dict[str, float] = {}

    def sockets(self) -> list[zmq.Socket]:
        """The sockets to poll; call `handle` when any is readable."""
        return [self.socket] + ([self.monitor] if self.monitor is not None else [])

    def refused(self, reason: str, detail: str) -> None:
        """Count a refusal and log it, rate-limited."""
        self.counts[reason] += 1
        line = self.refusals.line(reason, detail, self._clock())
        if line is not None:
            log.warning("%s; %d refused so far", line, self.counts[reason])

    def handle(self) -> int:
        """Answer every waiting request and note every handshake failure; return how many."""
        return self._answer() + self._watch()

    def _answer(self) -> int:
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
                self.refused("auth-denied", f"{address.decode(errors='replace')}: {reason} "
                                            "(add it to the collector's allowed/ folder and restart to let it in)")
                self.socket.send_multipart([b"1.0", request_id, b"400", reason.encode(), b"", b""])

    def _watch(self) -> int:
        if self.monitor is None:
            return 0
        from zmq.utils.monitor import parse_monitor_message

        count = 0
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return count
            count += 1
            endpoint = event["endpoint"].decode(errors="replace")
            now = self._clock()
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # The peer hung up mid-handshake: what a client without CURVE keys does when it
                # sees the mismatch first. Right after a protocol failure it is that one's tail.
                if now - self._protocol_failed_at.get(endpoint, -1e9) < 1.0:
                    continue
                self.refused("auth-dropped", f"a client broke off the handshake on {endpoint} "
                                             f"({os.strerror(event['value'])}); if it has no CURVE keys, {_NO_KEYS}")
                continue
            self._protocol_failed_at[endpoint] = now
            reason, text = _FAILURES.get(event["value"], ("auth-handshake", "a handshake on {endpoint} failed ({code})"))
            self.refused(reason, text.format(endpoint=endpoint, code=_error_name(event["value"])))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(0)
        self.socket.close(0)


def _error_name(code: int) -> str:
    try:
        return zmq.Event(code).name
    except ValueError:
        return str(code)


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
