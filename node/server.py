"""`dipnode serve`: the running node, composed of its parts, stage by stage.

- ingest (node/ingest/receiver.py): the receiver's threads (pynetdicom's, one per association)
  only spool and index; node/ingest/completion.py says which series are complete;
- jobs (node/jobs/worker.py): one scheduler thread turns complete series into jobs, matches
  PET to MR and starts jobs on the executor; the retriever (node/jobs/retrieval.py), when
  [[sources]] are set, fetches a prior MR from the PACS;
- delivery (node/delivery/sender.py): the same thread sends results back, by routes built
  once at start (node/wire.py);
- ops (node/ops/): the same thread runs retention's sweeps (node/ops/retention.py); metrics
  are counted through callbacks given to the parts above; the HTTP port (status page,
  /metrics, /healthz) has its own threads.

This module is the only place that wires the parts together. All state lives in the store, so
a restart resumes where it stopped. One writer: the node takes an exclusive lock on its spool
and its database (node/ingest/lock.py) before it touches either; a second process on the same
spool or database stops at once.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from dipnode.dicom_io.logsafe import SafeValuesFilter
from dipnode.dicom_io.provenance import software_version
from dipnode.dicom_io.scp import ReceivedInstance, start_receiver
from dipnode.dicom_io.status import Status
from dipnode.node import wire
from dipnode.node.delivery.sender import Delivery
from dipnode.node.ingest.completion import complete_due
from dipnode.node.ingest.lock import WriterLock
from dipnode.node.ingest.receiver import Receiver
from dipnode.node.ingest.spool import Spool
from dipnode.node.jobs import pipeline
from dipnode.node.jobs.retrieval import Retriever
from dipnode.node.jobs.store import Store
from dipnode.node.jobs.worker import Runner, Worker
from dipnode.node.ops.http import HttpConfig, HttpServer
from dipnode.node.ops.metrics import NodeMetrics
from dipnode.node.ops.retention import Policy, Retention, SweepReport
from dipnode.node.ops.site import NodeSite
from dipnode.node.settings import Settings

log = logging.getLogger(__name__)


class Node:
    """The service: receive, assemble, match, denoise, send back.

    run: what runs one job's pipeline (default :func:`node.pipeline.run`); the demo wraps it
    to keep the fit for its report.
    """

    def __init__(self, settings: Settings, *, run: Runner = pipeline.run) -> None:
        # Before anything else: nothing of another node's spool or database is touched.
        self._lock = WriterLock.for_node(settings.storage.spool_dir, settings.storage.database)
        try:
            self.settings = settings
            # Built once: an unreadable certificate stops the start with its key named.
            client_tls = wire.client_tls(settings)
            routes = wire.destination_routes(settings, client_tls)
            self._receiver_config = wire.receiver_config(settings)
            self.store = Store.open(settings.storage.database)
            spool = Spool(settings.storage.spool_dir,
                          min_free_bytes=settings.storage.min_free_mb * 1024 * 1024,
                          max_instance_bytes=settings.node.max_instance_mb * 1024 * 1024)
        except BaseException:
            self._lock.release()
            raise
        self._stop = threading.Event()
        spool_dir = Path(settings.storage.spool_dir)
        # Running for months: metrics, retention, the HTTP port (node/ops/).
        self.metrics = NodeMetrics(lambda: self.store, spool_dir)
        self.thumbnails = spool_dir / "thumbnails"
        r = settings.retention
        self.retention = Retention(
            self.store, spool_dir,
            Policy(inputs_days=r.inputs_days, failed_days=r.failed_days, outputs_days=r.outputs_days,
                   emergency_free_bytes=settings.emergency_free_mb * 1024 * 1024),
            outputs_dir=spool_dir / "outputs", thumbnails_dir=self.thumbnails,
            on_sweep=self._swept) if r.enabled else None
        self._next_sweep = 0.0
        self._last_sweep: str | None = None
        self.receiver = Receiver(spool, self.store,
                                 make_room=self.retention.emergency if self.retention else None)
        # Prior MR from the PACS ([[sources]]); its thread starts once the receiver listens
        # (a C-MOVE's sub-operations come to the receiver).
        self.retriever = (Retriever(settings, self.store, self.receiver.on_store, tls=client_tls)
                          if settings.sources else None)
        self.delivery = Delivery(settings, self.store, routes, self._stop, on_attempt=self.metrics.attempt)
        self.worker = Worker(settings, self.store, spool_dir / "outputs",
                             hand_over=self.delivery.hand_over, stopping=self._stop,
                             retriever=self.retriever, run=run, thumbnails=self.thumbnails,
                             on_queued=self.metrics.mr_wait_seconds.observe,
                             on_computed=lambda method, s: self.metrics.fit_seconds.labels(method=method).observe(s))
        self._listener = None
        self._scheduler: threading.Thread | None = None
        h = settings.http
        self.http = HttpServer(
            HttpConfig(host=h.host, port=h.port, token=h.token, admin_token=h.admin_token, refresh_s=h.refresh_s),
            NodeSite(ae_title=settings.node.ae_title, store=self.store, spool_root=spool_dir,
                     min_free_bytes=spool.min_free_bytes, thumbnails=self.thumbnails,
                     registry=self.metrics.registry, refresh_s=h.refresh_s,
                     emergency_below_bytes=self.retention.policy.emergency_free_bytes if self.retention else None,
                     last_sweep=lambda: self._last_sweep,
                     scheduler_alive=lambda: (self._scheduler is not None and self._scheduler.is_alive()
                                              and not self._stop.is_set()))) if h.enabled else None

    @property
    def spool(self) -> Spool:
        return self.receiver.spool

    def on_store(self, instance: ReceivedInstance) -> Status:
        """Keep one received instance (node/ingest/receiver.py: spooled and indexed before SUCCESS)."""
        return self.receiver.on_store(instance)

    def index_orphans(self) -> int:
        """Index or quarantine the spool files the index lacks (node/ingest/receiver.py)."""
        return self.receiver.index_orphans()

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        removed = self.spool.recover()
        if self.retention is not None:
            # A sweep killed between its steps is finished before the spool is scanned for
            # unindexed files (node/ops/retention.py): its files are never indexed again.
            self.retention.finish_interrupted()
        self.receiver.index_orphans()
        now = time.time()
        resumed = self.store.resume_after_restart(now)
        if removed or resumed.requeued or resumed.sending:
            log.info("recovered: %d partial files removed, jobs requeued %s, sending %s",
                     removed, list(resumed.requeued), list(resumed.sending))
        for job_id in resumed.sending:
            if not self.store.deliveries(job_id):
                # Killed between the SENDING transition and its deliveries (two transactions
                # in Worker._run_job): without this the job would wait for a delivery that never comes.
                log.info("job %d was sending with no deliveries recorded: handing it over now", job_id)
                self.delivery.hand_over(job_id, self.store.job(job_id).output_dir or "", now)
        self._listener = start_receiver(self._receiver_config, self.receiver.on_store, self.metrics.stored)
        # Series interrupted by the downtime get a full stable age from now (completion.is_due).
        self.worker.listening_since = time.time()
        self._scheduler = threading.Thread(target=self._loop, name="dipnode-scheduler", daemon=True)
        self._scheduler.start()
        if self.retriever is not None:
            self.retriever.start()
        if self.http is not None:
            self.http.start()
        log.info("dipnode %s listening as %s on %s:%d", software_version(),
                 self.settings.node.ae_title, self.settings.node.host, self.port)

    @property
    def port(self) -> int:
        return self._listener.port if self._listener else self.settings.node.port

    def stop(self) -> None:
        """Stop receiving and scheduling; a running fit stops at its next epoch and stays
        RUNNING in the store, so the next start re-queues it."""
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        if self.retriever is not None:
            self.retriever.stop()
        if self._listener is not None:
            self._listener.stop()
        if self._scheduler is not None:
            self._scheduler.join(timeout=60)
        self.worker.shutdown()
        self.store.close()
        self._lock.release()

    def _loop(self) -> None:
        interval = self.settings.series.check_interval_s
        while not self._stop.is_set():
            try:
                self.tick(time.time())
            except Exception:  # the node keeps serving; the trace says what broke
                log.exception("scheduler step failed")
            self._stop.wait(interval)

    def tick(self, now: float) -> None:
        """One scheduling step, stage by stage: complete series go to the worker, the worker
        matches and starts jobs, then the due deliveries are sent."""
        for done in complete_due(self.store, now, self.settings.series.stable_age_s,
                                 self.worker.listening_since):
            self.metrics.series_completed.labels(modality=done.series.modality).inc()
            self.worker.series_complete(done.series, now, rerun=done.rerun)
        self.worker.step(now)
        self.delivery.deliver(now)
        self._retain(now)

    def _retain(self, now: float) -> None:
        """Retention: the emergency sweep as soon as the spool is below its emergency mark,
        the scheduled sweep every sweep_interval_s."""
        if self.retention is None:
            return
        self.retention.emergency()
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.retention.sweep_interval_s
            self.retention.sweep(now)

    def _swept(self, report: SweepReport) -> None:
        self.metrics.swept(report)
        self._last_sweep = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({report.kind}): {report.series} series, "
                            f"{report.outputs} results, {report.bytes_freed / 1048576:.1f} MB")


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; a stop leaves unfinished jobs to resume at the next start.

    Raises node.lock.NodeLocked when another node holds the spool or the database."""
    for handler in logging.getLogger().handlers:
        # Values from the wire reach the log escaped and cut, wherever they are logged.
        handler.addFilter(SafeValuesFilter())
    node = Node(settings)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    print(f"dipnode listening as {settings.node.ae_title} on {settings.node.host}:{node.port}",
          flush=True)
    stopping.wait()
    node.stop()
    return 0
