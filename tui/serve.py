"""`expman-tui --serve`: the same app in a browser, through textual-serve.

textual-serve runs one command per browser tab with Textual's web driver; here the command
is this package run for the same root, so the browser shows exactly what the terminal
shows. There is no login: anyone who can reach the port sees the runs, hence loopback by
default and an SSH tunnel (`ssh -L 8000:localhost:8000 HOST`) to reach it from a laptop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from textual_serve.server import Server

log = logging.getLogger("expman.tui.serve")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def app_command(root: Path, *, poll: float, keys: str | None = None) -> str:
    """The shell command textual-serve starts per browser tab: this interpreter, this app, this root.

    `exec` makes the app the server's direct child (no shell in between), so stopping
    the server reaches it.
    """
    argv = [sys.executable, "-m", "expman.tui", str(root), "--poll", repr(poll)]
    if keys:
        argv += ["--keys", keys]
    return "exec " + shlex.join(argv)


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8, ::1: addresses only this machine reaches."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_for(host: str, port: int) -> str:
    """http://HOST:PORT, with an IPv6 literal in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ExpmanServer(Server):
    """textual-serve's Server with expman's start-up line and a same-site check on the websocket.

    Browsers let any web page open a websocket to localhost; without the Origin check a
    page you visit while the server runs could read your runs through it.
    """

    def __init__(self, command: str, *, root: Path, host: str, port: int, public_url: str | None = None) -> None:
        url = public_url or url_for(host, port)
        super().__init__(command, host=host, port=port, title=f"expman {root}", public_url=url)
        self.root = root
        public = urlsplit(url)
        self.allowed_hosts = LOOPBACK_NAMES | {host, public.hostname or host}
        self.allowed_ports = {port, public.port or DEFAULT_PORTS.get(public.scheme, port)}
        self.sessions: set[asyncio.Task] = set()

    async def on_startup(self, app: web.Application) -> None:
        print(f"expman-tui: serving {self.root} on {self.public_url} (Ctrl+C stops)", flush=True)
        if not is_loopback(self.host):
            print(f"expman-tui: listening on {self.host}, not loopback: there is no login, anyone who can "
                  f"reach port {self.port} sees these runs", flush=True)

    def origin_allowed(self, origin: str) -> bool:
        """A browser's websocket Origin is ours: a loopback name or the served host, on the served port."""
        parts = urlsplit(origin)
        try:
            port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        return parts.hostname in self.allowed_hosts and port in self.allowed_ports

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin):
            log.warning("refused a websocket from origin %s (not %s)", origin, self.public_url)
            raise web.HTTPForbidden(text=f"expman-tui: websocket from origin {origin} refused\n")
        session = asyncio.current_task()
        assert session is not None
        self.sessions.add(session)
        try:
            return await super().handle_websocket(request)
        finally:
            self.sessions.discard(session)

    async def on_shutdown(self, app: web.Application) -> None:
        # An open websocket would hold the server up to aiohttp's shutdown timeout (60 s);
        # cancelling its handler makes textual-serve tell that tab's app to quit, and wait for it.
        for session in list(self.sessions):
            session.cancel()


def serve(root: Path, *, host: str, port: int, poll: float, keys: str | None = None,
          public_url: str | None = None) -> int:
    """Serve the app for `root` until Ctrl+C or SIGTERM; 1 when the address cannot be bound."""
    server = ExpmanServer(app_command(root, poll=poll, keys=keys), root=root, host=host, port=port,
                          public_url=public_url)
    try:
        server.serve()
    except OSError as error:
        print(f"expman-tui: cannot serve on {url_for(host, port)}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


__all__ = ["ExpmanServer", "app_command", "is_loopback", "serve", "url_for"]
