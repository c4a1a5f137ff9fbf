"""The sd_notify protocol (standard library only) and the collector's service status.

systemd starts a `Type=notify` service with $NOTIFY_SOCKET naming a unix datagram
socket: a path, or an abstract-namespace name written with a leading '@'. The service
sends newline-separated `KEY=value` assignments to it: READY=1 once it serves, STATUS=
a line for `systemctl status`, WATCHDOG=1 at least every $WATCHDOG_USEC/2 when the unit
has WatchdogSec= (only if $WATCHDOG_PID is unset or names this process), STOPPING=1
when it begins to shut down. Without $NOTIFY_SOCKET every call is a no-op, so the same
daemon runs unchanged under a shell, Slurm, Kubernetes or a test.

`Notifier` is the protocol and nothing else; `ServiceStatus` is the collector's policy
(what to report, how often), called from the receive loop between turns.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, Protocol

log = logging.getLogger("expman.collector")

SEND_TIMEOUT_S = 1.0  # a full notify queue must never stall the receive loop for long
STATUS_INTERVAL_S = 1.0  # at most one STATUS= line this often (rates are averaged over it)


def _socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as a connect() address; None for kinds this module does not speak."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. systemd's vsock:CID:PORT (for VMs); not ours to handle


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when not asked."""
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None  # the watchdog is meant for another process of the unit
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """Send sd_notify messages; a no-op when the service manager did not ask for them.

    Every method returns whether a message went out. Errors are logged once and never
    raised: telling systemd how we are is not worth stopping the collector over.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_name = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval = _watchdog_interval(env) if self.socket_name else None
        self._address = _socket_address(self.socket_name) if self.socket_name else None
        if self.socket_name and self._address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path or @name; not notifying", self.socket_name)
        self._sock: socket.socket | None = None
        self._failed = False
        self._stopping_sent = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: Any) -> bool:
        """Send one message of `KEY=value` lines, e.g. notify(READY=1, STATUS="up")."""
        if self._address is None:
            return False
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec by default
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("could not notify the service manager at %s: %s", self.socket_name, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell the manager shutdown has begun (once; later calls do nothing)."""
        if self._stopping_sent:
            return False
        self._stopping_sent = True
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: Any) -> str:
    return str(value).replace("\n", " ")


class _RunLike(Protocol):
    def running_ranks(self) -> list[int]: ...


class _CollectorLike(Protocol):
    runs: Mapping[str, _RunLike]
    counters: Mapping[str, int]
    rejects: Mapping[str, int]


class ServiceStatus:
    """The collector's periodic hook: WATCHDOG=1 when due, STATUS= when it changes.

    Call it with the loop's monotonic time (the Collector's `on_periodic`). The status
    line reads like `2 runs active (16 ranks), 1.52M points/s, 310 frames/s, 0 rejected`;
    rates are averaged since the previous line.
    """

    def __init__(self, notifier: Notifier, collector: _CollectorLike, *, status_interval: float = STATUS_INTERVAL_S) -> None:
        self.notifier = notifier
        self.collector = collector
        self.status_interval = status_interval
        self._next_ping = 0.0
        self._last_at: float | None = None
        self._last_points = 0
        self._last_frames = 0
        self._last_line = ""

    def __call__(self, now: float) -> None:
        if not self.notifier.enabled:
            return
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= self._next_ping:
            self.notifier.watchdog()
            self._next_ping = now + interval
        if self._last_at is None:
            self._mark(now)
        elif now - self._last_at >= self.status_interval:
            line = self.line(now)
            self._mark(now)
            if line != self._last_line:
                self._last_line = line
                self.notifier.status(line)

    def line(self, now: float | None = None) -> str:
        """The status line for now (rates since the last line, or zero before the first)."""
        c = self.collector
        active = [run for run in c.runs.values() if run.running_ranks()]
        ranks = sum(len(run.running_ranks()) for run in active)
        elapsed = (now - self._last_at) if (now is not None and self._last_at is not None) else 0.0
        points = c.counters.get("points", 0) - self._last_points
        frames = c.counters.get("frames", 0) - self._last_frames
        rate_points = points / elapsed if elapsed > 0 else 0.0
        rate_frames = frames / elapsed if elapsed > 0 else 0.0
        runs = f"{len(active)} run{'' if len(active) == 1 else 's'} active"
        refused = sum(n for reason, n in c.rejects.items() if reason.startswith("auth-"))
        return (f"{runs} ({ranks} rank{'' if ranks == 1 else 's'}), {_si(rate_points)} points/s, "
                f"{_si(rate_frames)} frames/s, {sum(c.rejects.values()) - refused} rejected"
                + (f", {refused} handshakes refused" if refused else ""))

    def _mark(self, now: float) -> None:
        self._last_at = now
        self._last_points = self.collector.counters.get("points", 0)
        self._last_frames = self.collector.counters.get("frames", 0)


def _si(rate: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= factor:
            return f"{rate / factor:.3g}{suffix}"
    return f"{rate:.3g}" if rate < 10 else f"{rate:.0f}"
