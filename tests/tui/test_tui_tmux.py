"""Smoke test: the real `expman-tui` in a real terminal (tmux), keys in, screen text out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _helpers import wait_for
from _tui_runs import make_root, private_tui_state  # noqa: F401 (autouse)

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")


def tmux(*args: str) -> str:
    return subprocess.run([TMUX, *args], capture_output=True, text=True, timeout=10).stdout


@pytest.fixture
def session(tmp_path: Path):
    name = f"expman-tui-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run([TMUX, "kill-session", "-t", name], capture_output=True, timeout=10)


def test_expman_tui_in_tmux(tmp_path, session):
    make_root(tmp_path / "root")
    exe = Path(sys.executable).with_name("expman-tui")
    command = f"{exe} {tmp_path / 'root'}" if exe.exists() else f"{sys.executable} -m expman.tui {tmp_path / 'root'}"
    done = tmp_path / "exit-code"
    subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "120", "-y", "36",
                    "-e", "TERM=xterm-256color", "-e", f"XDG_STATE_HOME={tmp_path / 'state'}",
                    f"{command}; echo $? > {done}; sleep 30"], check=True, timeout=10)

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", session)

    try:
        wait_for(lambda: "baseline-aaaa0001" in screen(), 60, "the runs list in tmux")
    except AssertionError as exc:  # say what the terminal showed instead
        raise AssertionError(f"{exc}; the pane showed:\n{screen()}") from None
    assert "wide-aaaa0002" in screen() and "running" in screen()
    tmux("send-keys", "-t", session, "Down", "Enter")
    wait_for(lambda: "1 Charts" in screen() and "last" in screen(), 60, "the run screen with a chart")
    assert "mnist/baseline-aaaa0001" in screen() and "┤" in screen()
    tmux("send-keys", "-t", session, "?")
    wait_for(lambda: "closes this" in screen(), 60, "the help screen")
    tmux("send-keys", "-t", session, "Escape")
    wait_for(lambda: "closes this" not in screen(), 60, "help closed")
    # Chart tools in a real terminal: s and l are remembered for the experiment, + zooms x to its second half.
    state = tmp_path / "state" / "expman" / "tui.yaml"
    tmux("send-keys", "-t", session, "s", "l", "+")
    wait_for(lambda: state.exists() and "log_y: true" in state.read_text() and "smoothing: 0.6" in state.read_text(),
             60, "smoothing and log y remembered")
    wait_for(lambda: any(line.split()[-3:] == ["50", "100", "149"] for line in screen().splitlines() if line.strip()),
             60, "the x axis zoomed to steps 50-149")
    tmux("send-keys", "-t", session, "0")
    wait_for(lambda: any(line.split()[-3:] == ["0", "100", "199"] for line in screen().splitlines() if line.strip()),
             60, "zoom reset")
    # A failed run: its exception under the header.
    tmux("send-keys", "-t", session, "Escape", "Down", "Enter")
    wait_for(lambda: "ZeroDivisionError: division by zero" in screen(), 60, "the failed run's exception")
    tmux("send-keys", "-t", session, "Escape")
    wait_for(lambda: "baseline-aaaa0001" in screen(), 60, "back on the runs list")
    started = time.monotonic()
    tmux("send-keys", "-t", session, "q")
    wait_for(done.exists, 30, "expman-tui to exit")
    assert time.monotonic() - started < 30  # a hang, not a speed
    assert done.read_text().strip() == "0"
