"""What the HTTP port (node/ops/http.py) asks of a running node, answered from its store, its
spool and its scheduler: the status page's view, thumbnails, the health checks, and the two
administrator actions (node/jobs/actions.py, as on the command line)."""
from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from dipnode.dicom_io.provenance import software_version
from dipnode.node.jobs.actions import request_rerun, request_resend
from dipnode.node.jobs.rows import SeriesRow, StoreError
from dipnode.node.jobs.store import Store
from dipnode.node.ops.status_page import JobView, PageView

__all__ = ["NodeSite"]

#: Finished jobs the page lists (every unfinished one is listed).
PAGE_FINISHED_JOBS = 200


class NodeSite:
    def __init__(self, *, ae_title: str, store: Store, spool_root: Path, min_free_bytes: int,
                 thumbnails: Path, registry: CollectorRegistry, refresh_s: int,
                 emergency_below_bytes: int | None, last_sweep: Callable[[], str | None],
                 scheduler_alive: Callable[[], bool]) -> None:
        self.ae_title = ae_title
        self.store = store
        self.spool_root = Path(spool_root)
        self.min_free_bytes = min_free_bytes
        self.thumbnails = Path(thumbnails)
        self.registry = registry
        self.refresh_s = refresh_s
        self.emergency_below_bytes = emergency_below_bytes
        self._last_sweep = last_sweep
        self._scheduler_alive = scheduler_alive

    def _free(self) -> int | None:
        try:
            return shutil.disk_usage(self.spool_root).free
        except OSError:
            return None

    def health(self) -> dict[str, str | None]:
        """/healthz: each check -> None when fine, else why not."""
        checks: dict[str, str | None] = {}
        try:
            self.store.check_writable()
            checks["database"] = None
        except (sqlite3.Error, StoreError) as exc:
            checks["database"] = f"not writable: {exc}"
        free = self._free()
        if free is None:
            checks["spool"] = "its free space cannot be read"
        else:
            checks["spool"] = (None if free >= self.min_free_bytes else
                               f"{free // 1048576} MB free, below the mark of {self.min_free_bytes // 1048576} MB")
        checks["workers"] = None if self._scheduler_alive() else "the scheduler is not running"
        return checks

    def page_view(self, admin_csrf: Callable[[int], str] | None) -> PageView:
        jobs = self.store.jobs()
        unfinished = [j for j in jobs if not j.state.terminal]
        finished = [j for j in jobs if j.state.terminal][-PAGE_FINISHED_JOBS:]
        series: dict[str, SeriesRow | None] = {}

        def one(uid: str | None) -> SeriesRow | None:
            if uid is None:
                return None
            if uid not in series:
                series[uid] = self.store.series(uid)
            return series[uid]

        views = tuple(JobView(j, one(j.pet_series_uid), one(j.mr_series_uid), tuple(self.store.deliveries(j.id)),
                              (self.thumbnails / f"job-{j.id}.png").is_file())
                      for j in (*finished, *unfinished))
        return PageView(
            ae_title=self.ae_title, version=f"dipnode {software_version()}",
            counts=self.store.job_counts(), dead_letters=self.store.dead_letter_count(),
            spool_free_bytes=self._free(), refuse_below_bytes=self.min_free_bytes,
            emergency_below_bytes=self.emergency_below_bytes, last_sweep=self._last_sweep(),
            jobs=views, refresh_s=self.refresh_s,
            admin_csrf=None if admin_csrf is None else {v.job.id: admin_csrf(v.job.id) for v in views})

    def thumbnail(self, job_id: int) -> Path | None:
        path = self.thumbnails / f"job-{job_id}.png"
        return path if path.is_file() else None

    def rerun(self, job_id: int) -> str:
        return f"job {request_rerun(self.store, job_id)} queued (re-run of job {job_id})"

    def resend(self, job_id: int) -> str:
        return f"job {job_id}: {request_resend(self.store, job_id)} deliveries queued again"
