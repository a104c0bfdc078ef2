"""The Ray driver: a child process of the node that submits jobs to the cluster.

Ray lives only here, never in the node's own process: ``ray.init`` on an unreachable address
retries for minutes, and a driver whose cluster dies may be ended by Ray's core worker. A
child process that hangs or dies costs the node nothing: it keeps receiving, and the
RayExecutor (node/jobs/ray_executor.py) starts another one.

Messages on the pipe (tuples, pickled), node -> bridge:
    ("submit", job_id, ComputeRequest)   ("cancel", job_id)   ("stop",)
bridge -> node:
    ("ready", description)  ("failed", reason)  (then the process ends)
    ("progress", job_id, {"epoch", "epochs", "loss", "worker", "attempt"})
    ("done", job_id, ComputeResult)   ("error", job_id, exception)

A job is one Ray task (``run_task``) asking for the job's resources; its request is put in
the object store (the volumes travel there, not through a shared file system) and the task
returns the arrays. The node alone reads series and writes DICOM and its database. A task
whose worker dies is retried by Ray (``max_retries``), its errors are not (``retry_exceptions``
off): a bad study fails once, with its own reason.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from dipnode.node.jobs.compute import ComputeRequest, ComputeResult, compute_local, worker_name
from dipnode.node.jobs.ray_board import ProgressBoard

log = logging.getLogger(__name__)

#: Seconds between progress reports of one task (and between the bridge's polls of them).
REPORT_EVERY_S = 0.5
#: Seconds between the bridge's checks that the head's GCS port still answers.
GCS_PROBE_EVERY_S = 2.0


@dataclass(frozen=True)
class BridgeConfig:
    address: str  # the head's GCS "host:port"
    node_ip: str | None
    gpus_per_job: float
    gpu_resource: str
    cpus_per_job: float
    retries: int
    connect_timeout_s: float


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it crosses the pipe to the node (pickle), else a RuntimeError with its text:
    a job's error must reach its job, never end the connection to the cluster."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception type may fail to pickle or to rebuild
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class WorkerLost(RuntimeError):
    """The job's worker died more often than the retries allow, or its Ray node went away."""


def run_task(job_id: int, request: ComputeRequest, board: Any) -> ComputeResult:
    """The Ray task: one job's alignment and fit on this worker, progress to ``board``."""
    import ray  # noqa: PLC0415 (a worker has Ray; the node's process never imports it)

    node = ray.get_runtime_context().get_node_id()
    where = f"{worker_name()} (Ray node {node[:12]})"
    last = [0.0]

    def progress(epoch: int, epochs: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= REPORT_EVERY_S or epoch == epochs:
            last[0] = now
            board.report.remote(job_id, {"epoch": epoch, "epochs": epochs, "loss": float(loss),
                                         "worker": where, "pid": os.getpid()})

    board.report.remote(job_id, {"epoch": 0, "epochs": request.params.epochs, "loss": float("nan"),
                                 "worker": where, "pid": os.getpid()})
    result = compute_local(request, progress)
    return ComputeResult(result.alignment, result.denoised, where, result.seconds)


def _probe(address: str, timeout_s: float) -> None:
    """A plain TCP connection to the GCS first: ray.init on a dead address retries for minutes."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def main(conn: Connection, config: BridgeConfig) -> None:
    """Run the bridge until the node says stop or its end of the pipe closes (the node died)."""
    logging.basicConfig(level=logging.WARNING)
    try:
        _probe(config.address, config.connect_timeout_s)
    except OSError as exc:
        conn.send(("failed", f"no answer from the Ray head at {config.address} ({exc})"))
        return
    try:
        import ray  # noqa: PLC0415
        from ray import exceptions as rex  # noqa: PLC0415
    except ImportError as exc:
        conn.send(("failed", f"Ray is not installed ({exc}); pip install 'dipnode[ray]'"))
        return
    try:
        kwargs: dict[str, Any] = {"_node_ip_address": config.node_ip} if config.node_ip else {}
        ray.init(address=config.address, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False, **kwargs)
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        # The actor's worker process starts now: seconds on a busy machine, whatever the
        # connection timeout says about the network.
        ray.get(board.take.remote(), timeout=max(60.0, config.connect_timeout_s))
    except Exception as exc:  # noqa: BLE001 - any failure to join is the reason we report
        conn.send(("failed", f"cannot join the Ray cluster at {config.address}: {type(exc).__name__}: {exc}"))
        return
    resources: dict[str, float] = {}
    num_gpus = 0.0
    if config.gpu_resource == "GPU":
        num_gpus = config.gpus_per_job
    elif config.gpus_per_job:
        resources[config.gpu_resource] = config.gpus_per_job
    task = ray.remote(run_task).options(num_cpus=config.cpus_per_job, num_gpus=num_gpus, resources=resources,
                                        max_retries=config.retries, retry_exceptions=False)
    total = ray.cluster_resources()
    conn.send(("ready", f"Ray {ray.__version__} cluster at {config.address}: "
                        + ", ".join(f"{k} {v:g}" for k, v in sorted(total.items())
                                    if k in ("CPU", "GPU", config.gpu_resource))))
    inflight: dict[Any, int] = {}  # ObjectRef -> job id
    by_job: dict[int, Any] = {}
    last_poll = last_probe = 0.0
    try:
        while True:
            if time.monotonic() - last_probe >= GCS_PROBE_EVERY_S:
                # Ray's own calls may wait a long time for a head that has gone (its GCS
                # reconnection timeout): a closed port is a clear answer now.
                last_probe = time.monotonic()
                try:
                    _probe(config.address, config.connect_timeout_s)
                except OSError as exc:
                    conn.send(("failed", f"the Ray head at {config.address} stopped answering ({exc})"))
                    break
            if conn.poll(0.1 if inflight else 0.5):
                msg = conn.recv()  # EOFError: the node is gone; its jobs end with this driver
                if msg[0] == "stop":
                    break
                if msg[0] == "submit":
                    _, job_id, request = msg
                    ref = task.remote(job_id, ray.put(request), board)
                    inflight[ref] = job_id
                    by_job[job_id] = ref
                elif msg[0] == "cancel":
                    ref = by_job.pop(msg[1], None)
                    if ref is not None:
                        inflight.pop(ref, None)
                        ray.cancel(ref, force=True)
                        board.forget.remote(msg[1])
            if inflight:
                ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
                for ref in ready:
                    job_id = inflight.pop(ref)
                    by_job.pop(job_id, None)
                    board.forget.remote(job_id)
                    try:
                        conn.send(("done", job_id, ray.get(ref)))
                    except rex.RayTaskError as exc:  # the job's own error: pass it on as raised
                        cause = exc.cause if exc.cause is not None else RuntimeError(str(exc))
                        conn.send(("error", job_id, _sendable(cause)))
                    except rex.UnserializableException as exc:
                        # The job's error could not be rebuilt here: it is still this job's error
                        # (its text, with the worker's traceback), never the cluster's.
                        conn.send(("error", job_id, RuntimeError(f"on the Ray worker: {exc}")))
                    except (rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError,
                            rex.ObjectLostError, rex.TaskCancelledError) as exc:
                        conn.send(("error", job_id, WorkerLost(
                            f"the job's Ray worker died {config.retries + 1} time(s) "
                            f"({type(exc).__name__}); not retried further")))
            now = time.monotonic()
            if inflight and now - last_poll >= REPORT_EVERY_S:
                last_poll = now
                for job_id, info in ray.get(board.take.remote(), timeout=30).items():
                    if job_id in by_job:
                        conn.send(("progress", job_id, info))
    except (EOFError, BrokenPipeError):
        pass  # the node went away: leaving ends its tasks with this driver
    except Exception as exc:  # noqa: BLE001 - the cluster failed under us: say so, then end
        try:
            conn.send(("failed", f"the Ray cluster at {config.address} failed: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        ray.shutdown()
