"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any, Callable


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll until condition() is truthy; fail the test with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """Whether the process has exited (a zombie counts: it runs no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in (b"Z", b"X")


def run_async(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test body with asyncio.run (no async plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(test(*args, **kwargs))

    return wrapper


async def until(pilot: Any, condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Let a Textual app under the pilot run until condition() is truthy; fail after the
    deadline (a hang, not a speed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)


def collector_writes_buckets() -> bool:
    """Whether this checkout's collector takes a bucket root (`--staging-dir` comes with it):
    tests of what reads such runs skip until it does (issue 17)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "expman.collector", "--help"], capture_output=True, text=True, timeout=60)
    return "--staging-dir" in out.stdout
