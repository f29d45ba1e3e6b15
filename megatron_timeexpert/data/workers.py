"""Decode threads with a hard per-task deadline: a stuck thread is abandoned and replaced.

The loader submits one task per sample and waits for the oldest one. :meth:`DecodeTask.wait`
returns when the task is done, or raises :class:`TaskTimeout` once the task has been *running*
(not queued) longer than its deadline. The loader then calls :meth:`WorkerPool.abandon`: a fresh
thread takes the stuck one's place, so the pool keeps ``num_workers`` threads that make progress,
and the stuck thread exits on its own if its call ever returns (its result is thrown away).

Python cannot kill a thread. A thread stuck inside C code (a blocking read, a DALI pipeline) stays
blocked until that call returns; it is a daemon thread, so it never keeps the process alive. The
PyAV decoder also receives the deadline and gives up by itself between frames, so a decode that
loops in Python ends instead of burning a core.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class TaskTimeout(Exception):
    """A task ran longer than its deadline."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"no result after {seconds:.1f}s")


class DecodeTask:
    """One unit of work: ``fn(arg, deadline)`` run by a pool thread."""

    def __init__(self, fn: Callable[[Any, float], Any], arg: Any, timeout_s: float) -> None:
        self.fn, self.arg, self.timeout_s = fn, arg, timeout_s
        self.started_at: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.abandoned = False
        self._done = threading.Event()

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.result = self.fn(self.arg, self.started_at + self.timeout_s)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting consumer, re-raised there
            self.error = exc
        self._done.set()

    def wait(self, poll_s: float = 0.05) -> Any:
        """The task's result (or its exception, re-raised); :class:`TaskTimeout` once it has run too long."""
        while not self._done.wait(poll_s):
            started = self.started_at
            if started is not None and time.monotonic() - started > self.timeout_s:
                raise TaskTimeout(time.monotonic() - started)
        if self.error is not None:
            raise self.error
        return self.result


class WorkerPool:
    """``num_workers`` daemon threads taking :class:`DecodeTask` s from one queue, in order."""

    def __init__(self, num_workers: int, name: str) -> None:
        self.name = name
        self.replaced = 0
        self._queue: queue.SimpleQueue[DecodeTask | None] = queue.SimpleQueue()
        self._spawned = 0
        self._live = 0
        self._lock = threading.Lock()
        for _ in range(num_workers):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            self._spawned += 1
            self._live += 1
            name = f"{self.name}-{self._spawned}"
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                break
            if task.cancelled:
                continue
            task.run()
            if task.abandoned:
                break  # replaced while stuck: the replacement serves the queue now
        with self._lock:
            self._live -= 1

    def submit(self, fn: Callable[[Any, float], Any], arg: Any, timeout_s: float) -> DecodeTask:
        task = DecodeTask(fn, arg, timeout_s)
        self._queue.put(task)
        return task

    def abandon(self, task: DecodeTask) -> None:
        """Give up on a stuck task: its thread is replaced by a fresh one."""
        task.abandoned = True
        self.replaced += 1
        self._spawn()

    @property
    def live_threads(self) -> int:
        """Threads serving the queue or still stuck in an abandoned task."""
        with self._lock:
            return self._live

    def shutdown(self, pending: list[DecodeTask]) -> None:
        """Cancel ``pending`` tasks and let every thread exit (without waiting for stuck ones)."""
        for task in pending:
            task.cancelled = True
        with self._lock:
            live = self._live
        for _ in range(live):
            self._queue.put(None)
