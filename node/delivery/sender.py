"""Delivery: a finished job's results go to every destination, each instance's status checked,
with exponential backoff up to [sender] retries, then a dead letter that `dipnode resend`
clears; a job's results are deleted once every destination has them (docs/DESIGN.md "The
durability contract")."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from dipnode.dicom_io.scu import Destination as Peer
from dipnode.dicom_io.scu import send_files
from dipnode.node.jobs.rows import JobState
from dipnode.node.jobs.store import Store
from dipnode.node.settings import Settings
from dipnode.node.wire import Route, sender_tls

log = logging.getLogger(__name__)

__all__ = ["Delivery"]


class Delivery:
    """Hands SENDING jobs their deliveries and works through the due ones (``deliver``).

    routes: every configured destination by its label (node.wire.destination_routes, built
    once at start).
    """

    def __init__(self, settings: Settings, store: Store, routes: Mapping[str, Route],
                 stopping: threading.Event,
                 on_attempt: Callable[[float | None, str], None] | None = None) -> None:
        """on_attempt(seconds or None, outcome): each attempt, for the metrics; outcome is
        "sent", "retry" or "dead" (None seconds: nothing was sent)."""
        self._on_attempt = on_attempt
        self.settings = settings
        self.store = store
        self.routes = dict(routes)
        self._stopping = stopping

    def hand_over(self, job_id: int, out_dir: str, now: float) -> None:
        """A SENDING job gets one pending delivery per destination, or is DONE without any."""
        if self.routes:
            self.store.add_deliveries(job_id, list(self.routes), now)
        else:
            # Keep what the job's record already says (e.g. the on_oom fallback it took).
            prior = self.store.job(job_id).reason
            kept = f"no destinations configured; results kept in {out_dir}"
            self.store.transition(job_id, JobState.DONE, now,
                                  reason=f"{prior}; {kept}"[-2000:] if prior else kept)

    def _route(self, label: str) -> Route:
        route = self.routes.get(label)
        if route is None:
            # A delivery stored for a destination the settings no longer list (edited between
            # two starts) still goes where it was promised, by its label, over TLS when
            # [sender] tls says so; its route is made once.
            log.warning("delivery to %s: not in [[destinations]] any more; sending by its label", label)
            route = Route(Peer.parse(label), sender_tls(self.settings) if self.settings.sender.tls else None)
            self.routes[label] = route
        return route

    def deliver(self, now: float) -> None:
        """One pass over the due deliveries: send, record, schedule a retry or settle."""
        s = self.settings.sender
        for d in self.store.due_deliveries(now):
            if self._stopping.is_set():
                return
            job = self.store.job(d.job_id)
            files = sorted(Path(job.output_dir).rglob("*.dcm")) if job.output_dir else []
            if not files or job.outputs_purged_at is not None:
                self.store.delivery_result(d.job_id, d.destination, now, ok=False, next_attempt_at=None,
                                           error="results missing on disk" if job.outputs_purged_at is None
                                           else "results deleted by retention")
                if self._on_attempt is not None:
                    self._on_attempt(None, "dead")
                continue
            route = self._route(d.destination)
            t0 = time.monotonic()
            report = send_files(files, route.peer, calling_ae=self.settings.calling_ae,
                                timeout_s=s.timeout_s, tls=route.tls)
            seconds = time.monotonic() - t0
            ok = report.all_ok
            error = None if ok else (report.error or f"{report.n_failed} instances refused")
            attempts = d.attempts + 1
            retry_at = None
            if not ok and attempts <= s.retries:
                retry_at = time.time() + min(s.backoff_s * 2 ** (attempts - 1), s.backoff_max_s)
            row = self.store.delivery_result(d.job_id, d.destination, time.time(), ok=ok,
                                             error=error, next_attempt_at=retry_at)
            if self._on_attempt is not None:
                self._on_attempt(seconds, "sent" if ok else "retry" if retry_at else "dead")
            log.info("job %d -> %s: %s%s", d.job_id, d.destination,
                     "delivered" if ok else f"failed ({error})",
                     "" if ok or retry_at else ", gave up (dead letter)")
            if row.state is JobState.DONE and row.output_dir:
                shutil.rmtree(row.output_dir, ignore_errors=True)  # every destination has it
