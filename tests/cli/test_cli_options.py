"""What the three commands say about a bad option value: one line, exit 2, no traceback.

The cases call each program's main() as its console script does (a traceback would fail
the test as the exception it is); starting and binding use real processes.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import expman

PROGRAMS = {"expman": "expman", "expman-collector": "expman.collector", "expman-tui": "expman.tui"}


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def run(program: str, *argv: str) -> Done:
    """`program argv...` in this process: its exit status and what it printed."""
    from expman._cli.main import main as expman_main
    from expman.collector._daemon import main as collector_main
    from expman.tui import main as tui_main

    entry = {"expman": expman_main, "expman-collector": collector_main, "expman-tui": tui_main}[program]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
    return Done(code or 0, out.getvalue(), err.getvalue())


def one_line_error(done: Done, program: str, *words: str) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and len(err.splitlines()) == 1, done.stderr
    assert err.startswith(f"{program}") and ": error: " in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("argv, words", [
    (["--log-level", "verbose"], ["'verbose'", "DEBUG, INFO"]),
    (["--config", "/nonexistent.yaml"], ["/nonexistent.yaml", "no such file"]),
    (["--bind", "foo://x"], ["'foo://x'", "ipc://PATH or tcp://HOST:PORT"]),
    (["--bind", "tcp://127.0.0.1:notaport"], ["notaport", "port"]),
    (["--bind", "tcp://127.0.0.1"], ["tcp://HOST:PORT"]),
    (["--bind", "ipc:///tmp/x.sock", "--hardware-interval", "-1"], ["--hardware-interval", "-1"]),
    (["--bind", "ipc:///tmp/x.sock", "--heartbeat-timeout", "0"], ["--heartbeat-timeout"]),
    (["--bind", "ipc:///tmp/x.sock", "--idle-exit", "soon"], ["--idle-exit", "'soon'"]),
    (["--bind", "ipc:///tmp/x.sock", "--socket-mode", "rw-rw----"], ["--socket-mode", "octal"]),
    (["--bind", "ipc:///tmp/x.sock", "--forward", "head:5555"], ["--forward"]),
    ([], ["--bind"]),
])
def test_collector_option_errors(argv, words):
    one_line_error(run("expman-collector", *argv), "expman-collector", *words)


def test_collector_config_values_are_checked_like_options(tmp_path):
    config = tmp_path / "c.yaml"
    for text, words in [("bind: [ipc:///tmp/a.sock, 'tcp://x:y']\n", ["bind", "tcp://x:y"]),
                        ("bind: ipc:///tmp/a.sock\nlog_level: loud\n", ["log_level", "'loud'"]),
                        ("bind: ipc:///tmp/a.sock\nhardware_interval: -2\n", ["hardware_interval"]),
                        ("bind: ipc:///tmp/a.sock\nsurprise: 1\n", ["unknown settings ['surprise']"]),
                        ("bind: [unclosed\n", ["not readable YAML"])]:
        config.write_text(text)
        one_line_error(run("expman-collector", "--config", str(config)), "expman-collector", str(config), *words)


def test_collector_that_cannot_bind_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "expman.collector", "--bind", "tcp://no-such-host.invalid:5555",
                           "--root", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("expman-collector: error: cannot listen on")


@pytest.mark.parametrize("argv, words", [
    (["--poll", "-1"], ["--poll"]),
    (["--poll", "abc"], ["'abc'", "not a number"]),
    (["--port", "70000"], ["--port", "65535"]),
    (["--keys", ","], ["--keys"]),
    (["/no/such/root"], ["/no/such/root is not a folder"]),
])
def test_tui_option_errors(argv, words):
    one_line_error(run("expman-tui", *argv), "expman-tui", *words)


@pytest.mark.parametrize("argv, words", [
    (["ls", "--root", "/nope"], ["--root /nope is not a folder"]),
    (["demo", "--steps", "0"], ["--steps"]),
    (["demo", "--steps", "many"], ["'many'"]),
    (["sync", "--timeout", "-5"], ["--timeout"]),
    (["sync", "--collector", "localhost:5555"], ["--collector"]),
    (["export", "some-run", "-o", "x.xlsx"], ["x.xlsx", "--format"]),
    (["import", "/no/such/logdir"], ["/no/such/logdir is not a folder"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_expman_option_errors(argv, words):
    one_line_error(run("expman", *argv), "expman", *words)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_version_and_help(program):
    done = run(program, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"{program} {expman.__version__}"
    done = run(program, "--help")
    assert done.returncode == 0
    if program == "expman-collector":  # required, though argparse cannot enforce it (bind: in --config will do)
        assert re.search(r"^required \(on the command line, or as bind: in --config\):\n +--bind ENDPOINT",
                         done.stdout, re.MULTILINE), done.stdout
        assert "exit after this many seconds with no running run and no frame (default: never)" in " ".join(done.stdout.split())
    flat = " ".join(done.stdout.split())
    if program == "expman-tui":
        assert "seconds between reads of live runs (default: 0.25 on a folder, 2 on a bucket" in flat
        assert "port to listen on (default: 8000)" in flat
    if program == "expman":
        assert "COMMAND" in flat
        sync = run(program, "sync", "--help")
        assert "seconds to wait for each file's acks (default: 60.0)" in " ".join(sync.stdout.split())


def test_curve_init_prints_a_collector_command_that_starts(tmp_path):
    """The printed collector command, with its --bind, starts a CURVE collector as printed,
    from a shell where the venv is not activated (README's first command leaves it so)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "expman").exists():
        pytest.skip("expman is not installed as a console script beside this python")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    done = subprocess.run([str(bin_dir / "expman"), "keys", "curve-init", "--dir", str(tmp_path / "keys")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith("collector:"))
    command = shlex.split(line.split(":", 1)[1].split(" (accepts", 1)[0])
    assert command[0].endswith("expman-collector") and "--bind" in command and "--curve-secret" in command
    command[command.index("--bind") + 1] = "tcp://127.0.0.1:0"  # the suggested port may be taken here
    ready = tmp_path / "ready.yaml"
    proc = subprocess.Popen([*command, "--root", str(tmp_path / "runs"), "--ready-file", str(ready)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        from _helpers import wait_for

        wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the collector to report ready")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
