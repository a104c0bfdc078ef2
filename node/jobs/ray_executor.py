"""RayExecutor: jobs computed on a Ray cluster of GPU workers; the node stays the front door.

``[workers] executor = "ray"``. Each job still runs its node-side part in a thread of the node
(reading its series, writing its DICOM outputs, its database rows), as with the LocalExecutor;
its computation (alignment, fit, blend: node/jobs/compute.py) goes to the cluster as one Ray
task through a driver process (node/jobs/ray_bridge.py), and this module never imports Ray.

Failure semantics (README "Scaling out"):

- a worker killed mid-fit: Ray runs the task again (``ray_retries``), on any worker with the
  resources; results come back once, and output UIDs derive from the job, so the PACS gets
  one set of series;
- the node killed: its driver ends with it and Ray ends the driver's tasks; the restarted
  node re-queues its RUNNING jobs and submits them again;
- the cluster unreachable or lost: ``ray_unreachable = "wait"`` keeps jobs queued (no free
  slots) and tries to connect again every ``ray_connect_timeout_s``; "fail" fails each job
  with the reason. Receiving never depends on the cluster.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dipnode.node.jobs.executor import ClusterUnavailable, ExecutorClosed, LocalExecutor
from dipnode.node.jobs.compute import ComputeRequest, ComputeResult, Progress
from dipnode.node.jobs.ray_bridge import BridgeConfig, main as bridge_main

if TYPE_CHECKING:
    from dipnode.node.settings import WorkersSettings

log = logging.getLogger(__name__)

__all__ = ["RayExecutor"]


@dataclass
class _Call:
    """One job's computation in flight: its progress reports and its outcome."""

    reports: "queue.Queue[dict[str, Any]]" = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    result: ComputeResult | None = None
    error: BaseException | None = None


class RayExecutor:
    """Node-side threads (at most ``max_concurrent``) whose jobs compute on a Ray cluster."""

    def __init__(self, config: BridgeConfig, *, max_concurrent: int = 1, unreachable: str = "wait") -> None:
        if unreachable not in ("wait", "fail"):
            raise ValueError(f"unreachable: expected 'wait' or 'fail', got {unreachable!r}")
        self.config = config
        self.unreachable = unreachable
        self._slots = LocalExecutor(max_concurrent)
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._attempts: dict[int, list[str]] = {}
        self._state = "connecting"  # connecting | ready | down
        self.reason = "connecting"
        self._resolved = threading.Event()  # the first connection attempt has an outcome
        self._closed = threading.Event()
        self._conn: Any = None
        self._proc: Any = None
        self._supervisor = threading.Thread(target=self._supervise, name="dipnode-ray", daemon=True)
        self._supervisor.start()

    @classmethod
    def from_settings(cls, w: "WorkersSettings") -> "RayExecutor":
        if w.ray_address is None:  # settings refuse it; a direct caller gets the same words
            raise ValueError("ray_address: expected the Ray head's 'host:port', got None")
        config = BridgeConfig(address=w.ray_address, node_ip=w.ray_node_ip, gpus_per_job=w.gpus_per_job,
                              gpu_resource=w.gpu_resource, cpus_per_job=w.cpus_per_job,
                              retries=w.ray_retries, connect_timeout_s=w.ray_connect_timeout_s)
        return cls(config, max_concurrent=w.max_concurrent_jobs, unreachable=w.ray_unreachable)

    # -- the connection to the cluster ---------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._state == "ready"

    def _supervise(self) -> None:
        """Start a driver; while it lives, read its messages; when it fails or dies, say why,
        end the calls in flight, and start another after a pause (``wait``) or at once when
        jobs ask (``fail``: compute fails them while it is down)."""
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded node
        while not self._closed.is_set():
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=bridge_main, args=(theirs, self.config), name="dipnode-ray-driver",
                               daemon=True)
            proc.start()
            theirs.close()
            with self._lock:
                self._conn, self._proc = ours, proc
            reason = self._read(ours, proc)
            ours.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
            if self._closed.is_set():
                break
            with self._lock:
                changed = self._state != "down" or self.reason != reason
                self._state, self.reason = "down", reason
                calls, self._calls = self._calls, {}
                self._conn = None
            self._resolved.set()
            (log.warning if changed else log.debug)(
                "Ray cluster unavailable: %s; jobs %s", reason,
                "wait in the queue" if self.unreachable == "wait" else "fail")
            for job_id, call in calls.items():
                call.error = ClusterUnavailable(f"Ray cluster lost while job {job_id} ran: {reason}",
                                                requeue=self.unreachable == "wait")
                call.done.set()
            self._closed.wait(self.config.connect_timeout_s)

    def _read(self, conn: Any, proc: Any) -> str:
        """Dispatch the driver's messages until it ends; return why it ended."""
        deadline = time.monotonic() + self.config.connect_timeout_s + 90  # + ray.init and the board actor
        while not self._closed.is_set():
            if self._state != "ready" and time.monotonic() > deadline:
                return (f"no connection to the Ray head at {self.config.address} within "
                        f"{self.config.connect_timeout_s:g} s")
            try:
                if not conn.poll(0.5):
                    if not proc.is_alive():
                        return f"the Ray driver process ended (exit status {proc.exitcode})"
                    continue
                msg = conn.recv()
            except (EOFError, OSError):
                return f"the Ray driver process ended (exit status {proc.exitcode})"
            kind = msg[0]
            if kind == "ready":
                with self._lock:
                    self._state, self.reason = "ready", msg[1]
                self._resolved.set()
                log.info("connected: %s", msg[1])
            elif kind == "failed":
                return msg[1]
            else:
                self._deliver(kind, msg[1], msg[2])
        return "stopping"

    def _deliver(self, kind: str, job_id: int, payload: Any) -> None:
        with self._lock:
            call = self._calls.get(job_id)
            if kind != "progress":
                self._calls.pop(job_id, None)
        if call is None:
            return
        if kind == "progress":
            call.reports.put(payload)
        elif kind == "done":
            call.result = payload
            call.done.set()
        else:
            call.error = payload
            call.done.set()

    def _send(self, msg: tuple[Any, ...]) -> bool:
        with self._lock:
            conn = self._conn
            if conn is None:
                return False
            try:
                conn.send(msg)
            except (OSError, ValueError):
                return False
        return True

    # -- the Executor protocol -------------------------------------------------------------------
    def submit(self, job_id: int, fn: Callable[[], object]) -> Future[object]:
        return self._slots.submit(job_id, fn)

    def running(self) -> list[int]:
        return self._slots.running()

    def free_slots(self) -> int:
        """No free slot while the cluster is down and jobs should wait for it: they stay queued."""
        if self.unreachable == "wait" and self._state != "ready":
            return 0
        return self._slots.free_slots()

    def attempts(self, job_id: int) -> list[str]:
        """The workers that started ``job_id`` so far (one more after each worker death)."""
        with self._lock:
            return list(self._attempts.get(job_id, []))

    def compute(self, job_id: int, request: ComputeRequest, progress: Progress | None = None) -> ComputeResult:
        """Run the job's computation on the cluster and wait for it, passing progress on.

        Raises what the job raised there, WorkerLost when its workers died beyond the retries,
        ClusterUnavailable when the cluster cannot be reached or is lost meanwhile, and
        whatever ``progress`` raises (the node's stop), after cancelling the task."""
        self._resolved.wait(self.config.connect_timeout_s + 35)
        call = _Call()
        with self._lock:
            ready = self._state == "ready"
            if ready:
                self._calls[job_id] = call
                self._attempts[job_id] = []
        if self._closed.is_set():
            raise ExecutorClosed(f"compute: executor is shut down; job {job_id} not started")
        if not ready or not self._send(("submit", job_id, request)):
            with self._lock:
                self._calls.pop(job_id, None)
            raise ClusterUnavailable(f"Ray cluster at {self.config.address} unavailable: {self.reason}",
                                     requeue=self.unreachable == "wait")
        log.info("job %d submitted to the Ray cluster (%.1f MB of volumes)", job_id, request.nbytes / 1e6)
        try:
            while True:
                finished = call.done.wait(0.25)
                self._pass_on(job_id, call, progress)
                if finished:
                    break
        except BaseException:
            self._send(("cancel", job_id))
            with self._lock:
                self._calls.pop(job_id, None)
            raise
        if call.error is not None:
            raise call.error
        assert call.result is not None  # done without error means a result
        return call.result

    def _pass_on(self, job_id: int, call: _Call, progress: Progress | None) -> None:
        while True:
            try:
                info = call.reports.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                seen = self._attempts.setdefault(job_id, [])
                new = [w for w in info.get("workers", [info["worker"]]) if w not in seen]
                seen.extend(new)
            for worker in new:
                if len(seen) > 1:
                    log.warning("job %d started again on %s (attempt %d: the worker before died)",
                                job_id, worker, len(seen))
                else:
                    log.info("job %d running on %s", job_id, worker)
            if progress is not None and info["epochs"]:
                progress(int(info["epoch"]), int(info["epochs"]), float(info["loss"]))

    def shutdown(self, wait: bool = True) -> None:
        """Stop the driver (its tasks end with it) and the node-side threads."""
        self._closed.set()
        self._send(("stop",))
        with self._lock:
            calls, self._calls = self._calls, {}
            proc = self._proc
        for job_id, call in calls.items():
            call.error = ClusterUnavailable(f"the node is stopping; job {job_id} resumes at its next start",
                                            requeue=True)
            call.done.set()
        self._slots.shutdown(wait=wait)
        if proc is not None:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
        self._supervisor.join(timeout=15)

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)
