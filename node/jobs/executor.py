"""Where jobs run: a small interface, so a distributed engine can replace the local threads.

The worker loop claims a job in the store (QUEUED -> RUNNING) only when the executor has a
free slot, then submits it; submit() refuses work beyond capacity instead of queueing it,
so that a job marked RUNNING in the store is really running. The submitted function owns the
job's state changes (SENDING, FAILED); the executor only runs it and logs what escapes it.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

__all__ = ["Executor", "ExecutorBusy", "ExecutorClosed", "LocalExecutor"]


class ExecutorBusy(ValueError):
    """submit() beyond capacity, or a job id already in flight."""


class ExecutorClosed(ValueError):
    """submit() after shutdown()."""


@runtime_checkable
class Executor(Protocol):
    max_concurrent: int

    def submit(self, job_id: int, fn: Callable[[], object]) -> Future[object]:
        """Start ``fn`` for ``job_id`` now; raise ExecutorBusy when no slot is free."""
        ...

    def running(self) -> list[int]:
        """Ids of jobs submitted and not yet finished."""
        ...

    def free_slots(self) -> int:
        ...

    def shutdown(self, wait: bool = True) -> None:
        """Accept no more jobs; with ``wait``, return once the running ones have finished."""
        ...


class LocalExecutor:
    """Threads in this process, at most ``max_concurrent`` jobs at once (default 1: one job per
    GPU, since two SDIP fits on one device contend for its memory and gain nothing)."""

    def __init__(self, max_concurrent: int = 1) -> None:
        if not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ValueError(f"max_concurrent: expected an integer >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="dipnode-job")
        self._lock = threading.Lock()
        self._running: dict[int, Future[object]] = {}
        self._closed = False

    def submit(self, job_id: int, fn: Callable[[], object]) -> Future[object]:
        with self._lock:
            if self._closed:
                raise ExecutorClosed(f"submit: executor is shut down; job {job_id} not started")
            if job_id in self._running:
                raise ExecutorBusy(f"submit: job {job_id} is already running")
            if len(self._running) >= self.max_concurrent:
                raise ExecutorBusy(
                    f"submit: expected a free slot (max_concurrent={self.max_concurrent}), "
                    f"got {len(self._running)} running: {sorted(self._running)}"
                )
            fut = self._pool.submit(self._run, job_id, fn)
            self._running[job_id] = fut
        return fut

    def _run(self, job_id: int, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except BaseException as exc:
            # The job function should have recorded FAILED itself; this is the last-resort log.
            log.error("job %d raised %s: %s", job_id, type(exc).__name__, exc, exc_info=exc)
            raise
        finally:
            # Free the slot before the future resolves, so whoever waits on it may submit at once.
            with self._lock:
                self._running.pop(job_id, None)

    def running(self) -> list[int]:
        with self._lock:
            return sorted(self._running)

    def free_slots(self) -> int:
        with self._lock:
            return 0 if self._closed else self.max_concurrent - len(self._running)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)
