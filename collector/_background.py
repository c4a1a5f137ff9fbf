"""Heavy work beside the receive loop: writing parts, merging them, summaries.

A part of a run with a million keys takes seconds to sort, index and summarize; done on
the receive loop, every other run's acknowledgements would wait that long. The loop
hands such work here instead and keeps answering: the rows are already durable in the
write-ahead log, so nothing waits on it but the Parquet copy. pyarrow and numpy release
the GIL for the bulk of it, so the loop keeps its core.

Each owner (a run's metrics store has two: its part writes, its merges) gets its jobs
run one at a time and in order (parts are written in segment order), on a few threads
shared by every owner, so one wide run finishing never holds up another run's parts.
Owners that can wait (merges: nothing is answered after them) run on threads of their
own at a lower CPU priority (LOW_NICE): while training processes and the receive loop
want the cores, merges take what is left, and catch up when logging slows. A job that fails (a full disk)
stays at the head of its owner's queue and is tried again after RETRY_S; the ones behind
it wait, because a later part must never cover the segments of one not yet written.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable

import pyarrow as pa

log = logging.getLogger("expman.collector")

THREADS = 2
RETRY_S = 5.0
LOW_NICE = 10  # added to the nice value of the threads that run low-priority owners (merges)
# Freed memory goes back to the OS after a job at most this often, and whenever the pool
# goes idle: malloc_trim walks the heap (ms each), and a thousand runs finishing at once
# write a thousand small parts (with a trim after each: ~5 us of collector CPU a point).
TRIM_EVERY_S = 0.05

Job = Callable[[], None]


class Stopped(Exception):
    """A job gave up part way because the collector is stopping (`Background.stopping`);
    it left nothing half done, and is dropped rather than tried again."""


def _trim() -> Callable[[], object]:
    """glibc's malloc_trim: numpy's and Python's freed buffers go back to the OS (each thread
    has its own malloc arena, which keeps them otherwise); a no-op elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda *_: None


_MALLOC_TRIM = _trim()


def _lower_priority() -> None:
    """The calling thread yields the CPU to normal work (Linux: nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + LOW_NICE)
    except (OSError, AttributeError):
        pass  # elsewhere: the same priority as the rest


def give_back_memory() -> None:
    """Arrow's pool and malloc's arenas return what parts and merges used."""
    pa.default_memory_pool().release_unused()
    _MALLOC_TRIM(0)


class Background:
    """Runs each owner's jobs in order on a small shared pool (low-priority owners on one of
    their own); `None` threads runs them inline."""

    def __init__(self, threads: int | None = THREADS, on_error: Callable[[Hashable, BaseException], None] | None = None) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="expman-parts") if threads else None
        self._low_pool = ThreadPoolExecutor(threads, thread_name_prefix="expman-merges",
                                            initializer=_lower_priority) if threads else None
        self._low: set[Hashable] = set()  # owners whose jobs run on the low-priority pool
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queues: dict[Hashable, deque[Job]] = {}
        self._running: set[Hashable] = set()
        self._trimmed_at = 0.0  # monotonic time memory last went back to the OS
        self._retry_at: dict[Hashable, float] = {}
        self.on_error = on_error
        self.failures = 0
        self.stopping = threading.Event()  # set when the collector must exit: long merges give up

    def submit(self, owner: Hashable, job: Job, low_priority: bool = False) -> None:
        """Queue `job` behind the owner's earlier ones; an owner is low-priority while a job
        submitted so waits (its jobs stay in order on one pool)."""
        if self._pool is None:
            job()
            return
        with self._lock:
            if low_priority:
                self._low.add(owner)
            self._queues.setdefault(owner, deque()).append(job)
            self._start(owner)

    def _start(self, owner: Hashable) -> None:
        """Under the lock: run the owner's queue unless it runs already or waits to retry."""
        if owner in self._running or owner in self._retry_at or not self._queues.get(owner):
            return
        self._running.add(owner)
        pool = self._low_pool if owner in self._low else self._pool
        assert pool is not None
        pool.submit(self._drain, owner)

    def _drain(self, owner: Hashable) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(owner)
                if not queue:
                    self._queues.pop(owner, None)
                    self._low.discard(owner)
                    self._running.discard(owner)
                    self._idle.notify_all()
                    return
                job = queue[0]
            try:
                job()
            except Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - kept at the head, tried again later
                with self._lock:
                    self.failures += 1
                    self._retry_at[owner] = time.monotonic() + RETRY_S
                    self._running.discard(owner)
                    self._idle.notify_all()
                if self.on_error is not None:
                    self.on_error(owner, exc)
                else:
                    log.error("background work for %s failed (%r); trying again in %.0f s", owner, exc, RETRY_S)
                return
            finally:
                self._give_back_memory(owner)
            with self._lock:
                queue.popleft()

    def _give_back_memory(self, owner: Hashable) -> None:
        """After a job: memory back to the OS, when the last was a while ago or nothing else waits."""
        now = time.monotonic()
        with self._lock:
            others_wait = any(q for o, q in self._queues.items() if o != owner)
            idle = not others_wait and len(self._queues.get(owner, ())) <= 1  # this job is the last
            due = idle or now - self._trimmed_at >= TRIM_EVERY_S
            if due:
                self._trimmed_at = now
        if due:
            give_back_memory()

    def retry_due(self, now: float | None = None) -> None:
        """Restart owners whose failed job is due again (the loop calls this between turns)."""
        if self._pool is None or not self._retry_at:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            for owner in [o for o, at in self._retry_at.items() if at <= now]:
                del self._retry_at[owner]
                self._start(owner)

    def active(self) -> bool:
        """Whether any job is queued or running."""
        return bool(self._running or self._queues)

    def busy(self, owner: Hashable) -> bool:
        """Whether the owner has work queued, running or waiting to retry."""
        with self._lock:
            return bool(self._queues.get(owner)) or owner in self._running

    def wait(self, owner: Hashable, timeout: float | None = None) -> bool:
        """Block until the owner's work is done (a failed job is retried at once); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._retry_at.pop(owner, None) is not None:
                self._start(owner)
            while self._queues.get(owner) or owner in self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
                if owner in self._retry_at:  # failed again: give up waiting for it
                    return False
        return True

    def close(self) -> None:
        for pool in (self._pool, self._low_pool):
            if pool is not None:
                pool.shutdown(wait=True)
