"""`expman-tui --serve`: the same app in a browser, through textual-serve.

textual-serve runs one command per browser tab with Textual's web driver; here the command
is this package run for the same root, so the browser shows exactly what the terminal
shows. There is no login: anyone who can reach the port sees the runs, hence loopback by
default and an SSH tunnel (`ssh -L 8000:localhost:8000 HOST`) to reach it from a laptop.

The page works offline (clusters often have no internet): textual-serve's page links a
web font from Google; here that link is replaced by its own copy of the font, served from
its static folder, and no other outside address is left in the page. `/run/REF` (a run id,
id prefix, name or folder, as `expman.open_run` takes it) opens that run's screen directly:
its websocket is `/ws/run/REF`, and that session's app starts with EXPMAN_TUI_OPEN=REF.
"""

from __future__ import annotations

import asyncio
import contextvars
import html
import ipaddress
import logging
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit

from aiohttp import web
from textual_serve import server as _textual_serve
from textual_serve.app_service import AppService
from textual_serve.server import Server

log = logging.getLogger("expman.tui.serve")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


OPEN_ENV = "EXPMAN_TUI_OPEN"  # the app opens this run first (tui/app.py)
EXTERNAL_LINK = re.compile(r"<link\b[^>]*\bhref=\"https?://[^\"]*\"[^>]*>", re.S)
EXTERNAL_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>", re.S)
FONTS = (("RobotoMono-VariableFont_wght.ttf", "normal"), ("RobotoMono-Italic-VariableFont_wght.ttf", "italic"))
_session_command: contextvars.ContextVar[str | None] = contextvars.ContextVar("expman_session_command", default=None)


def app_command(root: Path, *, poll: float, keys: str | None = None, open_ref: str | None = None) -> str:
    """The shell command textual-serve starts per browser tab: this interpreter, this app, this root.

    `exec` makes the app the server's direct child (no shell in between), so stopping
    the server reaches it.
    """
    argv = [sys.executable, "-m", "expman.tui", str(root), "--poll", repr(poll)]
    if keys:
        argv += ["--keys", keys]
    if open_ref:
        argv = ["env", f"{OPEN_ENV}={open_ref}", *argv]
    return "exec " + shlex.join(argv)


def offline_page(page: str, static_url: str) -> str:
    """textual-serve's page with no outside addresses: the web font from our static folder."""
    faces = "".join(
        f'@font-face {{ font-family: "Roboto Mono"; font-style: {style}; font-weight: 100 700; '
        f'src: url("{static_url}fonts/{name}") format("truetype"); }}' for name, style in FONTS)
    page = EXTERNAL_LINK.sub("", page)
    page = EXTERNAL_SCRIPT.sub("", page)
    return page.replace("</head>", f"<style>{faces}</style></head>", 1)


class _SessionAppService(AppService):
    """textual-serve's AppService, started with the command of the session being opened (a run's URL)."""

    def __init__(self, command: str, **kwargs) -> None:
        super().__init__(_session_command.get() or command, **kwargs)


# textual-serve builds each session's AppService inside its websocket handler; the command
# of a /ws/run/REF session reaches it through a context variable of that handler's task.
_textual_serve.AppService = _SessionAppService  # type: ignore[misc]


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

    def __init__(self, command: str, *, root: Path, host: str, port: int, public_url: str | None = None,
                 poll: float = 0.25, keys: str | None = None) -> None:
        url = public_url or url_for(host, port)
        super().__init__(command, host=host, port=port, title=f"expman {root}", public_url=url)
        self.root = root
        self.poll, self.keys = poll, keys
        public = urlsplit(url)
        self.allowed_hosts = LOOPBACK_NAMES | {host, public.hostname or host}
        self.allowed_ports = {port, public.port or DEFAULT_PORTS.get(public.scheme, port)}
        self.sessions: set[asyncio.Task] = set()

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        app.add_routes([web.get("/run/{ref}", self.handle_index, name="run"),
                        web.get("/ws/run/{ref}", self.handle_websocket, name="run-websocket")])
        return app

    async def handle_index(self, request: web.Request) -> web.Response:
        """The page, offline; under /run/REF its websocket opens that run."""
        response = await super().handle_index(request)
        static_url = self.public_url + str(request.app.router["static"].url_for(filename="/")).rstrip("/") + "/"
        page = offline_page(response.text or "", static_url)
        ref = request.match_info.get("ref")
        if ref:
            plain = f'data-session-websocket-url="{self._websocket_base()}/ws"'
            page = page.replace(plain, f'data-session-websocket-url="{self._websocket_base()}/ws/run/'
                                       f'{html.escape(quote(ref, safe=""))}"', 1)
        return web.Response(text=page, content_type="text/html")

    def _websocket_base(self) -> str:
        scheme, rest = self.public_url.split(":", 1)
        return ("wss:" if scheme == "https" else "ws:") + rest

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
        ref = request.match_info.get("ref")
        if ref:
            _session_command.set(app_command(self.root, poll=self.poll, keys=self.keys, open_ref=ref))
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
                          public_url=public_url, poll=poll, keys=keys)
    try:
        server.serve()
    except OSError as error:
        print(f"expman-tui: cannot serve on {url_for(host, port)}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


__all__ = ["ExpmanServer", "app_command", "is_loopback", "offline_page", "serve", "url_for"]
