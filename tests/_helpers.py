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
    while not (result := _check(condition, deadline, timeout, what)):
        time.sleep(0.02)
    return result


def _check(condition: Callable[[], object], deadline: float, timeout: float, what: str) -> object:
    """condition()'s result; AssertionError naming `what` once it is still falsy past the deadline."""
    result = condition()
    if not result and time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return result


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
    while not (result := _check(condition, deadline, timeout, what)):
        await pilot.pause(0.05)
    return result


def finish_behind_a_stopped_collector(exp: Any, pid: int, points: int, timeout: float) -> tuple[Any, list[bool]]:
    """SIGSTOP the collector `pid`, log steps 1..points-1 (step 0 already acknowledged),
    call finish(timeout) on a thread, and return (that thread, its result list) once every
    frame, the finish included, has been handed to ZeroMQ: queued to a collector that
    cannot read it."""
    import os
    import signal
    import threading

    os.kill(pid, signal.SIGSTOP)
    for step in range(1, points):
        exp.log_metric("loss", float(step), step=step)
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(exp.finish(timeout=timeout)))
    waiter.start()
    wait_for(lambda: exp._channel.finish_sent and exp.stats()["sent"] == points, 10, "every frame handed to ZeroMQ")
    return waiter, result
