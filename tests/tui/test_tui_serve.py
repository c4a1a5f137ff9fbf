"""`expman-tui --serve`: a real textual-serve server, a real HTTP GET and a real websocket session.

The websocket speaks textual-serve's protocol, as its page (static/js/textual.js) does: the
client sends JSON lists (`["resize", {...}]`, `["stdin", "keys"]`), the server sends the
app's terminal output as binary frames.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from _helpers import wait_for
from _tui_runs import make_run

try:
    import aiohttp
    import textual_serve  # noqa: F401
except ImportError:
    aiohttp = None

needs_textual_serve = pytest.mark.skipif(aiohttp is None, reason="textual-serve is not installed (pip install 'expman[serve]')")

ANSI = re.compile(r"\x1b(\[[0-9;?$]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`expman-tui ROOT --serve` on a free loopback port, in its own process group (killed whole at the end)."""
    root = tmp_path / "runs"
    make_run(root, "mnist", "baseline", "aaaa0001", steps=50)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "expman.tui", str(root), "--serve", "--port", str(port),
                                 "--poll", "0.2"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    served = Served(proc, port, log_path)
    try:
        wait_for(lambda: proc.poll() is not None or listening(port), 15, "expman-tui --serve to listen")
        assert proc.poll() is None, served.log()
        yield served
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def screen_text(frames: bytes) -> str:
    return ANSI.sub("", frames.decode("utf-8", "replace"))


async def read_until(ws: aiohttp.ClientWebSocketResponse, frames: bytearray, text: str, timeout: float) -> None:
    """Read the app's output frames until `text` is on screen; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while text not in screen_text(bytes(frames)):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{text!r} not on screen after {timeout} s: {screen_text(bytes(frames))[-2000:]!r}")
        try:
            message = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            continue
        if message.type == aiohttp.WSMsgType.BINARY:
            frames += message.data
        elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            raise AssertionError(f"websocket closed before {text!r} showed: {screen_text(bytes(frames))[-2000:]!r}")


def app_processes(server: psutil.Process) -> list[psutil.Process]:
    return [p for p in server.children(recursive=True) if "expman.tui" in " ".join(p.cmdline())]


@needs_textual_serve
def test_serve_shows_the_app_in_a_browser_session(served: Served):
    base = f"http://127.0.0.1:{served.port}"
    assert "serving" in served.log() and base in served.log()
    with urllib.request.urlopen(base + "/", timeout=10) as response:
        assert response.status == 200
        page = response.read().decode()
    ws_url = re.search(r'data-session-websocket-url="([^"]+)"', page).group(1)
    assert ws_url == f"ws://127.0.0.1:{served.port}/ws"
    server = psutil.Process(served.proc.pid)

    async def session() -> list[psutil.Process]:
        async with aiohttp.ClientSession() as client:
            # Another site's page in the same browser may not drive the app (cross-site websocket).
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(ws_url, headers={"Origin": "http://evil.example"})
            assert refused.value.status == 403
            async with client.ws_connect(f"{ws_url}?width=120&height=36", headers={"Origin": base}) as ws:
                await ws.send_json(["resize", {"width": 120, "height": 36}])
                frames = bytearray()
                await read_until(ws, frames, "baseline-aaaa0001", 20)  # the Runs screen of the real app
                await ws.send_json(["stdin", "?"])
                await read_until(ws, frames, "closes this", 10)  # keys reach it: the help screen
                apps = app_processes(server)
                assert len(apps) == 1, apps
                # Stopping the server (Ctrl+C, systemd) ends the session and its app at once.
                started = time.monotonic()
                served.proc.terminate()
                while not ws.closed:
                    await ws.receive(timeout=30)
                assert time.monotonic() - started < 30  # aiohttp alone would wait out its 60 s shutdown timeout
                return apps

    apps = asyncio.run(asyncio.wait_for(session(), 25))
    assert served.proc.wait(10) == 0, served.log()
    wait_for(lambda: not any(p.is_running() for p in apps), 30, "the app process to end with the server")


@needs_textual_serve
def test_app_leaves_when_the_server_is_killed(served: Served):
    """kill -9 gives the server no chance to stop its apps; each app notices it was orphaned and quits."""
    server = psutil.Process(served.proc.pid)

    async def session() -> list[psutil.Process]:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"ws://127.0.0.1:{served.port}/ws?width=100&height=30") as ws:
                await read_until(ws, bytearray(), "baseline-aaaa0001", 20)
                apps = app_processes(server)
                served.proc.kill()
                return apps

    apps = asyncio.run(asyncio.wait_for(session(), 25))
    assert len(apps) == 1, apps
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in apps), 10,
             "the orphaned app to quit")


@needs_textual_serve
def test_serve_on_a_busy_port_says_so(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "expman.tui", str(tmp_path), "--serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot serve on http://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_serve_without_textual_serve_says_what_to_install(tmp_path, monkeypatch, capsys):
    from expman.tui import main

    monkeypatch.setitem(sys.modules, "textual_serve", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "expman.tui.serve", raising=False)
    assert main([str(tmp_path), "--serve"]) == 2
    err = capsys.readouterr().err
    assert "--serve needs textual-serve" in err and "pip install 'expman[serve]'" in err


@needs_textual_serve
def test_websocket_origin_must_be_the_served_site():
    from expman.tui.serve import ExpmanServer

    local = ExpmanServer("true", root=Path("/runs"), host="127.0.0.1", port=8000)
    assert local.origin_allowed("http://127.0.0.1:8000") and local.origin_allowed("http://localhost:8000")
    assert not local.origin_allowed("http://evil.example:8000")  # another site, or DNS rebinding
    assert not local.origin_allowed("http://localhost:8888")  # another local web app's page
    assert not local.origin_allowed("null")
    tunnel = ExpmanServer("true", root=Path("/runs"), host="127.0.0.1", port=8000, public_url="http://localhost:9000")
    assert tunnel.origin_allowed("http://localhost:9000")


@needs_textual_serve
def test_only_loopback_hosts_go_without_a_warning():
    from expman.tui.serve import is_loopback

    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.0.0.2", "::1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "node01"]))


@needs_textual_serve
def test_served_page_is_offline_and_a_run_has_its_own_url(served: Served):
    """No outside address in the page (a cluster without internet); /run/REF opens that run."""
    base = f"http://127.0.0.1:{served.port}"
    with urllib.request.urlopen(base + "/", timeout=10) as response:
        page = response.read().decode()
    outside = [u for u in re.findall(r"""(?:href|src|url\()\s*=?\s*["']?(https?://[^"')\s]+)""", page)
               if not u.startswith(base)]
    assert outside == [] and "fonts.googleapis" not in page
    font = re.search(r'url\("([^"]+RobotoMono-VariableFont_wght\.ttf)"\)', page).group(1)
    with urllib.request.urlopen(font, timeout=10) as response:  # the font comes from the server itself
        assert response.status == 200 and len(response.read()) > 10_000
    with urllib.request.urlopen(base + "/run/aaaa", timeout=10) as response:  # an id prefix
        run_page = response.read().decode()
    ws_url = re.search(r'data-session-websocket-url="([^"]+)"', run_page).group(1)
    assert ws_url == f"ws://127.0.0.1:{served.port}/ws/run/aaaa"

    async def session() -> None:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"{ws_url}?width=120&height=36", headers={"Origin": base}) as ws:
                await ws.send_json(["resize", {"width": 120, "height": 36}])
                frames = bytearray()
                await read_until(ws, frames, "1 Charts", 20)  # straight to the run's screen
                await read_until(ws, frames, "mnist/baseline-aaaa0001", 20)  # its header, once read

    asyncio.run(asyncio.wait_for(session(), 30))


def test_find_run_by_folder_id_prefix_and_name(tmp_path):
    from expman.tui.data.runs import find_run

    a = make_run(tmp_path, "mnist", "baseline", "aaaa0001", steps=3)
    b = make_run(tmp_path, "mnist", "wide", "aaab0002", steps=3)
    assert find_run(tmp_path, "mnist/baseline-aaaa0001") == a and find_run(tmp_path, "aaab0002") == b
    assert find_run(tmp_path, "wide") == b and find_run(tmp_path, "aaaa") == a
    with pytest.raises(ValueError, match="names 2 runs"):
        find_run(tmp_path, "aaa")
    with pytest.raises(ValueError, match="no run"):
        find_run(tmp_path, "nothing")
