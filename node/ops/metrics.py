"""The node's Prometheus metrics (prometheus-client), served at ``/metrics`` (node/http.py).

Counters and histograms are counted where things happen (the receiver's answer, series
completion, the scheduler's job steps, the sender); gauges that the store already knows (jobs
by state, dead letters) and the spool's free bytes are read at scrape time, so they are right
after a restart too. Each Node has its own registry: two nodes in one process (tests) do not
share counts, and nothing is registered at import time.

Names follow Prometheus' conventions (base units: seconds, bytes; ``_total`` for counters).
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dipnode.dicom_io.status import Status
from dipnode.node.jobs.store import Store

__all__ = ["NodeMetrics", "status_label"]

# Waiting for an MR is minutes to an hour (mr_wait_s, retrieval); a fit is seconds (Gaussian)
# to hours (the paper preset on a CPU); a send is seconds to minutes.
_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600, 86400)
_FIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
_SEND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def status_label(status: int) -> str:
    """A C-STORE status as a label value: ``0xA700`` (hex, as PS3.7 Annex C writes them)."""
    return f"0x{int(status):04X}"


class _StoreGauges(Collector):
    """Gauges read at scrape time from the store, the spool's disk and torch."""

    def __init__(self, store: Callable[[], Store | None], spool_dir: Path) -> None:
        self._store = store
        self._spool_dir = Path(spool_dir)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self._store()
        if store is not None:
            jobs = GaugeMetricFamily("dipnode_jobs", "Jobs by state (from the job store).", labels=["state"])
            for state, n in store.job_counts().items():
                jobs.add_metric([state.value], n)
            yield jobs
            yield GaugeMetricFamily("dipnode_dead_letters",
                                    "Deliveries the sender gave up on, not re-sent yet (dipnode resend).",
                                    value=store.dead_letter_count())
        try:
            free = shutil.disk_usage(self._spool_dir).free
        except OSError:
            free = None
        if free is not None:
            yield GaugeMetricFamily("dipnode_spool_free_bytes", "Free bytes on the spool's file system.",
                                    value=free)
        torch = sys.modules.get("torch")  # only once a job has loaded it: a scrape never imports torch
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = GaugeMetricFamily("dipnode_gpu_memory_peak_bytes",
                                     "Peak GPU memory allocated by torch since the node started.",
                                     labels=["device"])
            for i in range(torch.cuda.device_count()):
                peak.add_metric([f"cuda:{i}"], torch.cuda.max_memory_allocated(i))
            yield peak


class NodeMetrics:
    """Every metric of one node, in its own registry."""

    def __init__(self, store: Callable[[], Store | None], spool_dir: Path) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            "dipnode_instances_received", "C-STORE instances stored (durable and indexed).", registry=r)
        self.instances_refused = Counter(
            "dipnode_instances_refused", "C-STORE instances refused, by the status answered.",
            ["status"], registry=r)
        self.series_completed = Counter(
            "dipnode_series_completed", "Series found complete, by modality.", ["modality"], registry=r)
        self.mr_wait_seconds = Histogram(
            "dipnode_mr_wait_seconds", "From a job's creation to its queueing (waiting for the MR).",
            registry=r, buckets=_WAIT_BUCKETS)
        self.fit_seconds = Histogram(
            "dipnode_fit_seconds", "Processing of one job: read, register, denoise, write.",
            ["method"], registry=r, buckets=_FIT_BUCKETS)
        self.send_seconds = Histogram(
            "dipnode_send_seconds", "One delivery attempt of a job's results to one destination.",
            registry=r, buckets=_SEND_BUCKETS)
        self.sender_retries = Counter(
            "dipnode_sender_retries", "Failed delivery attempts that will be retried.", registry=r)
        self.dead_letters_total = Counter(
            "dipnode_dead_letters_created", "Deliveries given up on (dead letters), ever.", registry=r)
        self.retention_sweeps = Counter(
            "dipnode_retention_sweeps", "Retention sweeps, by kind.", ["kind"], registry=r)
        self.retention_freed = Counter(
            "dipnode_retention_freed_bytes", "Bytes deleted by retention.", registry=r)
        self.retention_series = Counter(
            "dipnode_retention_series_deleted", "Series whose files retention deleted.", registry=r)
        r.register(_StoreGauges(store, spool_dir))

    def stored(self, status: int) -> None:
        """The receiver answered a C-STORE with ``status``."""
        # Success and the warnings (PS3.4 B.2.3: 0xBxxx, the instance was stored) are received.
        if int(status) == Status.SUCCESS or int(status) & 0xF000 == 0xB000:
            self.instances_received.inc()
        else:
            self.instances_refused.labels(status=status_label(status)).inc()

    def attempt(self, seconds: float | None, outcome: str) -> None:
        """One delivery attempt (node/delivery/sender.py): "sent", "retry" or "dead"."""
        if seconds is not None:
            self.send_seconds.observe(seconds)
        if outcome == "retry":
            self.sender_retries.inc()
        elif outcome == "dead":
            self.dead_letters_total.inc()

    def swept(self, report) -> None:  # node.ops.retention.SweepReport
        self.retention_sweeps.labels(kind=report.kind).inc()
        self.retention_freed.inc(report.bytes_freed)
        self.retention_series.inc(report.series)
